/* One instantiation of the fused TESKD loss for the element type R (float or double). Included twice by
 * teskd_loss_cpu.c, which defines R, its 64-byte vector type V (W lanes) and the matching integer vector VI,
 * VEXP and VLOG (exponential and logarithm of a vector), VHSUM and VHMAX (horizontal sum and maximum), VMAX
 * (lane-wise maximum), VLOAD_TAIL and VSTORE_TAIL (the first n < W lanes) and SUFFIX.
 *
 * Rows [row_begin, row_end) of the batch, for each row b:
 *   every head h (teacher h = 0, students 1..K): m = max z, s1 = sum exp(z - m), sT = sum exp((z - m) / T);
 *   CE_h = lse1 - z_y (label smoothing: lerp towards lse1 - mean z), summed with head weights;
 *   P = softmax(z_0 / T), h = sum_k (log(P + eps) - log Q_k), KD row = sum (P + eps) h;
 *   gradients (unscaled by grad_output, as closed_form.py documents):
 *     d/dz_h  += ce_weight w_h (softmax(z_h) - y_smooth) valid / n_valid
 *     d/dz_k  += kd_weight T / B (Q_k (1 + C eps) - (P + eps))
 *     d/dz_0  += kd_weight T / B P (h - sum P h)          (unless detach_teacher)
 *   FEA row = sum_k sum_d ((f_k - f_t) [f_k > 0 or f_t > 0])^2; its gradient is teskd_feature_grad's.
 * Per-row sums go to rows[3 b + {0, 1, 2}] (CE, KD, FEA) in double; teskd_reduce sums them in row order, so the
 * result does not depend on how rows were split between calls.
 *
 * Every logit row is first copied into a scratch row padded to a whole number of vectors (padding -inf: its
 * exponentials are 0; quantities derived from it are zeroed or never read), so that all loops over classes are
 * whole vectors: explicit vector code (GCC/Clang vector extensions), no scalar tails, sums reduced as trees.
 */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define W ((int64_t)(sizeof(V) / sizeof(R)))

static inline V CAT(vload, SUFFIX)(const R* p) {
    V v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void CAT(vstore, SUFFIX)(R* p, V v) { memcpy(p, &v, sizeof v); }

static inline V CAT(vsplat, SUFFIX)(R x) { return (V){0} + x; }

/* (a - b) [a > 0 or b > 0], as a product with a 0/1 factor, so that NaN and inf propagate as in the reference
 * (-inf * 0 is NaN; a select would give 0). The condition is max(a, b) > 0: the same for every non-NaN pair, and
 * a NaN makes a - b NaN whatever the factor. The factor is the comparison's bits and those of 1: three vector
 * operations and no conversion. */
static inline V CAT(masked_diff, SUFFIX)(V a, V b) {
    const V zero = {0}, one = zero + (R)1;
    VI one_bits, f;
    memcpy(&one_bits, &one, sizeof one);
    f = (VI)(VMAX(a, b) > zero) & one_bits;
    V factor;
    memcpy(&factor, &f, sizeof f);
    return (a - b) * factor;
}

static int64_t CAT(count_valid, SUFFIX)(const teskd_options* o, const int64_t* target) {
    int64_t n = 0;
    for (int64_t b = 0; b < o->B; ++b) n += target[b] != o->ignore_index && target[b] >= 0 && target[b] < o->C;
    return n;
}

/* e1 = exp(z - m), et = exp((z - m) / T) of one row of C logits, stored padded to whole vectors (padding 0),
 * and their sums. For T = 1, 2, 3, 4 (the published recipe's is 4), exp(d) = exp(d / T)^T: one exponential per
 * value instead of two (relative error T ulp). */
static inline void CAT(exp_pair, SUFFIX)(const R* z, int64_t C, R m, R inv_t, int t_int, R* e1, R* et, R* sum1,
                                         R* sum_t) {
    const V vm = CAT(vsplat, SUFFIX)(m), vit = CAT(vsplat, SUFFIX)(inv_t);
    V s1 = {0}, st = {0};
    for (int64_t c = 0; c < C; c += W) {
        const V zc = c + W <= C ? CAT(vload, SUFFIX)(z + c) : VLOAD_TAIL(z + c, C - c, -(R)INFINITY);
        const V d = zc - vm;
        const V e2 = VEXP(d * vit);
        V e;
        switch (t_int) {
            case 1:
                e = e2;
                break;
            case 2:
                e = e2 * e2;
                break;
            case 3:
                e = e2 * e2 * e2;
                break;
            case 4:
                e = (e2 * e2) * (e2 * e2);
                break;
            default:
                e = VEXP(d);
                break;
        }
        CAT(vstore, SUFFIX)(e1 + c, e);
        CAT(vstore, SUFFIX)(et + c, e2);
        s1 += e;
        st += e2;
    }
    *sum1 = VHSUM(s1);
    *sum_t = VHSUM(st);
}

/* sum over d of x^2, x = (f_s - f_t) [f_s > 0 or f_t > 0]; and, when g is not NULL, g = scale x (the feature
 * gradient, written in the same pass as the sum reads the features). Four accumulators: one would make the loop a
 * chain of dependent FMAs (4 cycles each), slower than its loads; the tail is a padded load (pad 0 adds 0).
 * Called with a constant NULL or non-NULL g, so that inlining specialises the loop. */
static inline double CAT(masked_sq, SUFFIX)(const R* fs, const R* ft, int64_t D, R* g, V scale) {
    V acc0 = {0}, acc1 = {0}, acc2 = {0}, acc3 = {0};
    int64_t d = 0;
#define MASKED_DIFF_AT(i) CAT(masked_diff, SUFFIX)(CAT(vload, SUFFIX)(fs + (i)), CAT(vload, SUFFIX)(ft + (i)))
#define STORE_GRAD(i, x) \
    if (g != NULL) CAT(vstore, SUFFIX)(g + (i), scale * (x))
    for (; d + 4 * W <= D; d += 4 * W) {
        const V x0 = MASKED_DIFF_AT(d), x1 = MASKED_DIFF_AT(d + W);
        const V x2 = MASKED_DIFF_AT(d + 2 * W), x3 = MASKED_DIFF_AT(d + 3 * W);
        acc0 += x0 * x0;
        acc1 += x1 * x1;
        acc2 += x2 * x2;
        acc3 += x3 * x3;
        STORE_GRAD(d, x0);
        STORE_GRAD(d + W, x1);
        STORE_GRAD(d + 2 * W, x2);
        STORE_GRAD(d + 3 * W, x3);
    }
    for (; d + W <= D; d += W) {
        const V x = MASKED_DIFF_AT(d);
        acc0 += x * x;
        STORE_GRAD(d, x);
    }
#undef STORE_GRAD
#undef MASKED_DIFF_AT
    if (d < D) {
        const V x = CAT(masked_diff, SUFFIX)(VLOAD_TAIL(fs + d, D - d, (R)0), VLOAD_TAIL(ft + d, D - d, (R)0));
        acc1 += x * x;
        if (g != NULL) VSTORE_TAIL(g + d, scale * x, D - d);
    }
    return (double)VHSUM((acc0 + acc1) + (acc2 + acc3));
}

static void CAT(teskd_reduce, SUFFIX)(const teskd_options* o, const int64_t* target, const double* rows, R* parts,
                                      R* total);

/* teacher [B, C]; students: K pointers to [B, C]; f_t [B, D] and f_s: K pointers to [B, D] (or NULL when D = 0);
 * grad [K + 1, B, C]; grad_f [K, B, D], the feature gradient 2 feat_weight (f_s - f_t) [f_s > 0 or f_t > 0], or
 * NULL (not computed); rows [B, 3]; parts [3] and total [1], or NULL. All contiguous. When parts and total are
 * given (one call for all rows), the rows are also reduced into them (see teskd_reduce). Returns 0; 1 + b when target[b] is neither a class
 * index in [0, C) nor ignore_index (nothing is computed); -1 when the scratch rows cannot be allocated. */
int64_t CAT(teskd_rows, SUFFIX)(const teskd_options* o, const R* teacher, const R* const* students,
                                const int64_t* target, const double* head_weights, const R* f_t, const R* const* f_s,
                                R* grad, R* grad_f, double* rows, R* parts, R* total) {
    const int64_t K = o->K, B = o->B, C = o->C, D = o->D, H = o->K + 1;
    for (int64_t b = 0; b < B; ++b)
        if (target[b] != o->ignore_index && (target[b] < 0 || target[b] >= C)) return 1 + b;
    const int64_t Cp = (C + W - 1) / W * W, Hp = (2 * H + W - 1) / W * W;
    const R inv_t = (R)(1.0 / o->temperature);
    const int t_int = (o->temperature == 1.0 || o->temperature == 2.0 || o->temperature == 3.0 ||
                       o->temperature == 4.0) ? (int)o->temperature : 0;
    const R ls = (R)o->label_smoothing;
    const double n_valid = (double)CAT(count_valid, SUFFIX)(o, target);
    const V eps = CAT(vsplat, SUFFIX)((R)o->kd_eps);
    const V ls_c = CAT(vsplat, SUFFIX)((R)(o->label_smoothing / (double)C));
    const V kd_scale = CAT(vsplat, SUFFIX)((R)(o->kd_weight * o->temperature / (double)B));
    const V kd_teacher = o->detach_teacher ? (V){0} : kd_scale;
    const R q_coef = (R)(1.0 + (double)C * o->kd_eps);
    const V feat_scale = CAT(vsplat, SUFFIX)((R)(2.0 * o->feat_weight));

    /* Scratch: per head exp(z - m) and exp((z - m) / T) padded to whole vectors; then h; the 2H sums whose
     * logarithms are taken together; per-head statistics. */
    R* e1 = (R*)malloc(sizeof(R) * (size_t)((2 * H + 1) * Cp + 2 * Hp));
    double* stats = (double*)malloc(sizeof(double) * (size_t)(3 * H));
    if (e1 == NULL || stats == NULL) {
        free(e1);
        free(stats);
        return -1;
    }
    R* et = e1 + H * Cp;
    R* hs = et + H * Cp;
    R* sums = hs + Cp; /* [Hp]: sum exp(z - m) of every head, then sum exp((z - m) / T); padding 1 */
    R* logsums = sums + Hp;
    double *m_h = stats, *lse_t = stats + H, *ce_coef = stats + 2 * H;
    for (int64_t j = 0; j < Hp; ++j) sums[j] = 1;

    for (int64_t b = o->row_begin; b < o->row_end; ++b) {
        const int64_t t = target[b];
        const int valid = t != o->ignore_index && t >= 0 && t < C;
        const int64_t y = valid ? t : 0;
#define ROW(h) ((h) == 0 ? teacher + b * C : students[(h) - 1] + b * C)

        for (int64_t h = 0; h < H; ++h) {
            const R* z = ROW(h);
            V vm = C >= W ? CAT(vload, SUFFIX)(z) : VLOAD_TAIL(z, C, -(R)INFINITY);
            int64_t c = W;
            for (; c + W <= C; c += W) vm = VMAX(vm, CAT(vload, SUFFIX)(z + c));
            if (c < C) vm = VMAX(vm, VLOAD_TAIL(z + c, C - c, -(R)INFINITY));
            const R m = VHMAX(vm);
            CAT(exp_pair, SUFFIX)(z, C, m, inv_t, t_int, e1 + h * Cp, et + h * Cp, &sums[h], &sums[H + h]);
            m_h[h] = (double)m;
        }
        for (int64_t c = 0; c < Hp; c += W) CAT(vstore, SUFFIX)(logsums + c, VLOG(CAT(vload, SUFFIX)(sums + c)));

        double ce_row = 0.0;
        for (int64_t h = 0; h < H; ++h) {
            const R* z = ROW(h);
            const double lse1 = m_h[h] + (double)logsums[h];
            double nll = lse1 - (double)z[y];
            if (o->label_smoothing > 0) {
                double zsum = 0.0;
                for (int64_t c = 0; c < C; ++c) zsum += (double)z[c];
                nll = (1.0 - o->label_smoothing) * nll + o->label_smoothing * (lse1 - zsum / (double)C);
            }
            if (valid) ce_row += head_weights[h] * nll;
            lse_t[h] = m_h[h] * (double)inv_t + (double)logsums[H + h];
            ce_coef[h] = valid ? o->ce_weight * head_weights[h] / n_valid : 0.0;
        }

        /* Teacher probabilities P (in place of exp((z_0 - m) / T)) and h = K log(P + eps) - sum_k log Q_k;
         * h of the padding is then set to 0 (its P is 0). */
        R* p = et;
        double lse_sum = 0.0;
        for (int64_t k = 1; k < H; ++k) lse_sum += lse_t[k];
        const V inv_st0 = CAT(vsplat, SUFFIX)((R)1 / sums[H]), kk = CAT(vsplat, SUFFIX)((R)K);
        const V lse_s = CAT(vsplat, SUFFIX)((R)lse_sum), vit = CAT(vsplat, SUFFIX)(inv_t);
        for (int64_t c = 0; c < C; c += W) {
            const V pc = CAT(vload, SUFFIX)(p + c) * inv_st0;
            CAT(vstore, SUFFIX)(p + c, pc);
            V hc = kk * VLOG(pc + eps) + lse_s;
            if (c + W <= C)
                for (int64_t k = 1; k < H; ++k) hc -= CAT(vload, SUFFIX)(ROW(k) + c) * vit;
            else
                for (int64_t k = 1; k < H; ++k) hc -= VLOAD_TAIL(ROW(k) + c, C - c, (R)0) * vit;
            CAT(vstore, SUFFIX)(hs + c, hc);
        }
        for (int64_t c = C; c < Cp; ++c) hs[c] = 0;
        V akd = {0}, aph = {0};
        for (int64_t c = 0; c < Cp; c += W) {
            const V pc = CAT(vload, SUFFIX)(p + c), hc = CAT(vload, SUFFIX)(hs + c);
            akd += (pc + eps) * hc;
            aph += pc * hc;
        }
        const R kd_row = VHSUM(akd);
        const V ph = CAT(vsplat, SUFFIX)(VHSUM(aph));

        /* Gradients of the teacher and the students, written straight into grad (the last vector masked). */
        for (int64_t h = 0; h < H; ++h) {
            const R* e = e1 + h * Cp;
            const R* e_t = et + h * Cp;
            R* g = grad + (h * B + b) * C;
            const R cc = (R)ce_coef[h];
            const V vcc = CAT(vsplat, SUFFIX)(cc), inv1 = CAT(vsplat, SUFFIX)((R)1 / sums[h]);
            const V q_scale = CAT(vsplat, SUFFIX)(q_coef / sums[H + h]);
            for (int64_t c = 0; c < C; c += W) {
                const V pc = CAT(vload, SUFFIX)(p + c);
                const V ce = vcc * (CAT(vload, SUFFIX)(e + c) * inv1 - ls_c);
                const V gc = h > 0 ? ce + kd_scale * (q_scale * CAT(vload, SUFFIX)(e_t + c) - (pc + eps))
                                   : ce + kd_teacher * pc * (CAT(vload, SUFFIX)(hs + c) - ph);
                if (c + W <= C)
                    CAT(vstore, SUFFIX)(g + c, gc);
                else
                    VSTORE_TAIL(g + c, gc, C - c);
            }
            g[y] -= cc * (1 - ls);
        }
#undef ROW

        /* Masked squared error of the student features against the (detached) teacher feature, and its gradient. */
        double feat_row = 0.0;
        for (int64_t k = 0; D > 0 && k < K; ++k) {
            const R *fs = f_s[k] + b * D, *ft = f_t + b * D;
            feat_row += grad_f != NULL ? CAT(masked_sq, SUFFIX)(fs, ft, D, grad_f + (k * B + b) * D, feat_scale)
                                       : CAT(masked_sq, SUFFIX)(fs, ft, D, NULL, feat_scale);
        }
        rows[3 * b] = ce_row;
        rows[3 * b + 1] = (double)kd_row;
        rows[3 * b + 2] = feat_row;
    }
    free(e1);
    free(stats);
    if (parts != NULL) CAT(teskd_reduce, SUFFIX)(o, target, rows, parts, total);
    return 0;
}

/* The feature gradient, computed in the backward from the inputs (it is linear in them), already scaled:
 * grad_f[k, b] = scale (f_s[k][b] - f_t[b]) [f_s[k][b] > 0 or f_t[b] > 0] for rows [row_begin, row_end). */
void CAT(teskd_feature_grad, SUFFIX)(const teskd_options* o, const R* f_t, const R* const* f_s, R* grad_f,
                                     double scale) {
    const int64_t B = o->B, D = o->D, end = o->row_end * D;
    const V vsc = CAT(vsplat, SUFFIX)((R)scale);
    for (int64_t k = 0; k < o->K; ++k) {
        const R* fs = f_s[k];
        R* gf = grad_f + k * B * D;
        int64_t i = o->row_begin * D;
        for (; i + W <= end; i += W)
            CAT(vstore, SUFFIX)(gf + i, vsc * CAT(masked_diff, SUFFIX)(CAT(vload, SUFFIX)(fs + i),
                                                                         CAT(vload, SUFFIX)(f_t + i)));
        if (i < end) {
            const V x = CAT(masked_diff, SUFFIX)(VLOAD_TAIL(fs + i, end - i, (R)0), VLOAD_TAIL(f_t + i, end - i, (R)0));
            VSTORE_TAIL(gf + i, vsc * x, end - i);
        }
    }
}

/* dst = scale * src over n values (the backward's grad_output scaling of the stored logit gradients). */
void CAT(teskd_scale, SUFFIX)(const R* src, R* dst, int64_t n, double scale) {
    const R sc = (R)scale;
    const V vsc = CAT(vsplat, SUFFIX)(sc);
    int64_t i = 0;
    for (; i + W <= n; i += W) CAT(vstore, SUFFIX)(dst + i, vsc * CAT(vload, SUFFIX)(src + i));
    for (; i < n; ++i) dst[i] = sc * src[i];
}

/* parts = (CE, KD, FEA) unweighted, total = ce_weight CE + kd_weight KD + feat_weight FEA; rows summed in
 * order. */
static void CAT(teskd_reduce, SUFFIX)(const teskd_options* o, const int64_t* target, const double* rows, R* parts,
                                      R* total) {
    double ce = 0.0, kd = 0.0, feat = 0.0;
    for (int64_t b = 0; b < o->B; ++b) {
        ce += rows[3 * b];
        kd += rows[3 * b + 1];
        feat += rows[3 * b + 2];
    }
    ce /= (double)CAT(count_valid, SUFFIX)(o, target);
    kd *= o->temperature * o->temperature / (double)o->B;
    parts[0] = (R)ce;
    parts[1] = (R)kd;
    parts[2] = (R)feat;
    *total = (R)(o->ce_weight * ce + o->kd_weight * kd + o->feat_weight * feat);
}

void CAT(teskd_reduce_rows, SUFFIX)(const teskd_options* o, const int64_t* target, const double* rows, R* parts,
                                    R* total) {
    CAT(teskd_reduce, SUFFIX)(o, target, rows, parts, total);
}

#undef W
#undef CAT
#undef CAT_
