/* One instantiation of the fused TESKD loss for the element type R (float or double), with EXP and LOG its
 * exponential and logarithm and SUFFIX the name suffix. Included twice by teskd_loss_cpu.c.
 *
 * Rows [row_begin, row_end) of the batch, for each row b:
 *   every head h (teacher h = 0, students 1..K): m = max z, s1 = sum exp(z - m), sT = sum exp((z - m) / T);
 *   CE_h = lse1 - z_y (label smoothing: lerp towards lse1 - mean z), summed with head weights;
 *   P = softmax(z_0 / T), h = sum_k (log(P + eps) - log Q_k), KD row = sum (P + eps) h;
 *   gradients (unscaled by grad_output, as closed_form.py documents):
 *     d/dz_h  += ce_weight w_h (softmax(z_h) - y_smooth) valid / n_valid
 *     d/dz_k  += kd_weight T / B (Q_k (1 + C eps) - (P + eps))
 *     d/dz_0  += kd_weight T / B P (h - sum P h)          (unless detach_teacher)
 *     d/df_k   = feat_weight 2 (f_k - f_t) [f_k > 0 or f_t > 0]
 * Per-row sums go to rows[3 b + {0, 1, 2}] (CE, KD, FEA) in double; teskd_reduce sums them in row order, so the
 * result does not depend on how rows were split between calls.
 */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

static int64_t CAT(count_valid, SUFFIX)(const teskd_options* o, const int64_t* target) {
    int64_t n = 0;
    for (int64_t b = 0; b < o->B; ++b) n += target[b] != o->ignore_index && target[b] >= 0 && target[b] < o->C;
    return n;
}

/* Loops over a padded row: n is a whole number of vector blocks (the hint lets the compiler drop scalar tails);
 * reductions through `omp simd`, which keeps one accumulator per lane in registers. */
#define TESKD_PADDED(n)                                   \
    do {                                                  \
        if ((n) % TESKD_BLOCK != 0) __builtin_unreachable(); \
    } while (0)

/* e1 = exp(z - m), et = exp((z - m) / T) over a padded row; returns their sums. For T = 1, 2, 3, 4 (the
 * published recipe's is 4), exp(d) = exp(d / T)^T: one exponential per value instead of two (relative error
 * T ulp); values below the smallest normal number flush to 0, as the exponential itself does. */
static inline void CAT(exp_pair, SUFFIX)(const R* restrict z, R m, R inv_t, int t_int, int64_t n, R* restrict e1,
                                         R* restrict et, R* sum1, R* sum_t) {
    R s1 = 0, st = 0;
    const R tiny = (R)TESKD_TINY;
    TESKD_PADDED(n);
#define TESKD_EXP_LOOP(E1_OF_E2)                                  \
    _Pragma("omp simd reduction(+ : s1, st)")                     \
    for (int64_t c = 0; c < n; ++c) {                             \
        const R d = z[c] - m;                                     \
        const R e2 = EXP(d * inv_t);                              \
        R e = E1_OF_E2;                                           \
        e = e * (R)(e >= tiny);                                   \
        e1[c] = e;                                                \
        et[c] = e2;                                               \
        s1 += e;                                                  \
        st += e2;                                                 \
    }
    switch (t_int) {
        case 1:
            TESKD_EXP_LOOP(e2)
            break;
        case 2:
            TESKD_EXP_LOOP(e2 * e2)
            break;
        case 3:
            TESKD_EXP_LOOP(e2 * e2 * e2)
            break;
        case 4:
            TESKD_EXP_LOOP((e2 * e2) * (e2 * e2))
            break;
        default:
            TESKD_EXP_LOOP(EXP(d))
            break;
    }
#undef TESKD_EXP_LOOP
    *sum1 = s1;
    *sum_t = st;
}

/* teacher [B, C]; students: K pointers to [B, C]; f_t [B, D] and f_s: K pointers to [B, D] (or NULL when D = 0);
 * grad [K + 1, B, C]; rows [B, 3]. All contiguous. Returns 0, or -1 when the scratch rows cannot be allocated. */
int64_t CAT(teskd_rows, SUFFIX)(const teskd_options* o, const R* restrict teacher, const R* const* students,
                                const int64_t* restrict target, const double* restrict head_weights,
                                const R* restrict f_t, const R* const* f_s, R* restrict grad,
                                double* restrict rows) {
    const int64_t K = o->K, B = o->B, C = o->C, D = o->D, H = o->K + 1;
    /* Every row is copied into a scratch row padded to a whole number of blocks: logits -inf (their exponentials
     * are 0), everything derived from the padding is 0 or never read. */
    const int64_t Cp = (C + TESKD_BLOCK - 1) / TESKD_BLOCK * TESKD_BLOCK;
    const int64_t Hp = (2 * H + TESKD_BLOCK - 1) / TESKD_BLOCK * TESKD_BLOCK;
    const R inv_t = (R)(1.0 / o->temperature);
    const int t_int = (o->temperature == 1.0 || o->temperature == 2.0 || o->temperature == 3.0 ||
                       o->temperature == 4.0) ? (int)o->temperature : 0;
    const R eps = (R)o->kd_eps;
    const R ls = (R)o->label_smoothing;
    const R ls_c = (R)(o->label_smoothing / (double)C);
    const R q_coef = (R)(1.0 + (double)C * o->kd_eps);
    const R kd_scale = (R)(o->kd_weight * o->temperature / (double)B);
    const double n_valid = (double)CAT(count_valid, SUFFIX)(o, target);

    /* Scratch: per head the padded logits, exp(z - m), exp((z - m) / T); then h, one gradient row, and the
     * sums whose logarithms are taken together. */
    R* zp = (R*)malloc(sizeof(R) * (size_t)((3 * H + 2) * Cp + 2 * Hp));
    double* stats = (double*)malloc(sizeof(double) * (size_t)(4 * H));
    if (zp == NULL || stats == NULL) {
        free(zp);
        free(stats);
        return -1;
    }
    R* e1 = zp + H * Cp;
    R* et = e1 + H * Cp;
    R* hs = et + H * Cp;
    R* gp = hs + Cp;
    R* sums = gp + Cp;     /* [Hp]: sum exp(z - m) of every head, then sum exp((z - m) / T) */
    R* logsums = sums + Hp;
    TESKD_PADDED(Cp);
    TESKD_PADDED(Hp);
    double *lse_t = stats, *ce_coef = stats + H, *m_h = stats + 2 * H;
    for (int64_t h = 0; h < H; ++h)
        for (int64_t c = C; c < Cp; ++c) zp[h * Cp + c] = -(R)INFINITY;
    for (int64_t j = 0; j < Hp; ++j) sums[j] = 1;

    for (int64_t b = o->row_begin; b < o->row_end; ++b) {
        const int64_t t = target[b];
        const int valid = t != o->ignore_index && t >= 0 && t < C;
        const int64_t y = valid ? t : 0;

        for (int64_t h = 0; h < H; ++h) {
            R* restrict z = zp + h * Cp;
            memcpy(z, (h == 0 ? teacher : students[h - 1]) + b * C, sizeof(R) * (size_t)C);
            R m = z[0];
#pragma omp simd reduction(max : m)
            for (int64_t c = 0; c < Cp; ++c) m = z[c] > m ? z[c] : m;
            CAT(exp_pair, SUFFIX)(z, m, inv_t, t_int, Cp, e1 + h * Cp, et + h * Cp, &sums[h], &sums[H + h]);
            m_h[h] = (double)m;
        }
        /* log of the 2H sums at once. */
#pragma omp simd
        for (int64_t c = 0; c < Hp; ++c) logsums[c] = LOG(sums[c]);

        double ce_row = 0.0;
        for (int64_t h = 0; h < H; ++h) {
            const R* restrict z = zp + h * Cp;
            const double lse1 = m_h[h] + (double)logsums[h];
            double nll = lse1 - (double)z[y];
            if (o->label_smoothing > 0) {
                R zsum = 0;
#pragma omp simd reduction(+ : zsum)
                for (int64_t c = 0; c < C; ++c) zsum += z[c];
                nll = (1.0 - o->label_smoothing) * nll + o->label_smoothing * (lse1 - zsum / (double)C);
            }
            if (valid) ce_row += head_weights[h] * nll;
            lse_t[h] = m_h[h] * (double)inv_t + (double)logsums[H + h];
            ce_coef[h] = valid ? o->ce_weight * head_weights[h] / n_valid : 0.0;
        }

        /* Teacher probabilities P (in place of exp((z_0 - m) / T)) and h = K log(P + eps) - sum_k log Q_k;
         * h of the padding is set to 0 (its P is 0). */
        R* restrict p = et;
        const R inv_st0 = (R)1 / sums[H];
        double lse_sum = 0.0;
        for (int64_t k = 1; k < H; ++k) lse_sum += lse_t[k];
        const R kk = (R)K, lse_s = (R)lse_sum;
#pragma omp simd
        for (int64_t c = 0; c < Cp; ++c) {
            p[c] *= inv_st0;
            hs[c] = kk * LOG(p[c] + eps) + lse_s;
        }
        for (int64_t k = 1; k < H; ++k) {
            const R* restrict z = zp + k * Cp;
#pragma omp simd
            for (int64_t c = 0; c < Cp; ++c) hs[c] -= z[c] * inv_t;
        }
        for (int64_t c = C; c < Cp; ++c) hs[c] = 0;
        R kd_row = 0, ph = 0;
#pragma omp simd reduction(+ : kd_row, ph)
        for (int64_t c = 0; c < Cp; ++c) {
            kd_row += (p[c] + eps) * hs[c];
            ph += p[c] * hs[c];
        }

        /* Gradients of the students, then of the teacher, through the padded row gp. */
        for (int64_t h = 1; h < H; ++h) {
            const R* restrict e = e1 + h * Cp;
            const R* restrict e_t = et + h * Cp;
            const R cc = (R)ce_coef[h], inv1 = (R)1 / sums[h], q_scale = q_coef / sums[H + h];
#pragma omp simd
            for (int64_t c = 0; c < Cp; ++c)
                gp[c] = cc * (e[c] * inv1 - ls_c) + kd_scale * (q_scale * e_t[c] - (p[c] + eps));
            gp[y] -= cc * (1 - ls);
            memcpy(grad + (h * B + b) * C, gp, sizeof(R) * (size_t)C);
        }
        {
            const R cc = (R)ce_coef[0], inv1 = (R)1 / sums[0];
            const R kd_t = o->detach_teacher ? (R)0 : kd_scale;
#pragma omp simd
            for (int64_t c = 0; c < Cp; ++c) gp[c] = cc * (e1[c] * inv1 - ls_c) + kd_t * p[c] * (hs[c] - ph);
            gp[y] -= cc * (1 - ls);
            memcpy(grad + b * C, gp, sizeof(R) * (size_t)C);
        }

        /* Masked squared error of the student features against the (detached) teacher feature. */
        double feat_row = 0.0;
        if (D > 0) {
            const R* restrict ft = f_t + b * D;
            for (int64_t k = 0; k < K; ++k) {
                const R* restrict fs = f_s[k] + b * D;
                R sq = 0;
#pragma omp simd reduction(+ : sq)
                for (int64_t d = 0; d < D; ++d) {
                    const R diff = (fs[d] - ft[d]) * (R)((fs[d] > 0) | (ft[d] > 0));
                    sq += diff * diff;
                }
                feat_row += (double)sq;
            }
        }
        rows[3 * b] = ce_row;
        rows[3 * b + 1] = (double)kd_row;
        rows[3 * b + 2] = feat_row;
    }
    free(zp);
    free(stats);
    return 0;
}

/* The feature gradient, computed in the backward from the inputs (it is linear in them), already scaled:
 * grad_f[k, b] = scale (f_s[k][b] - f_t[b]) [f_s[k][b] > 0 or f_t[b] > 0] for rows [row_begin, row_end). */
void CAT(teskd_feature_grad, SUFFIX)(const teskd_options* o, const R* restrict f_t, const R* const* f_s,
                                     R* restrict grad_f, double scale) {
    const int64_t B = o->B, D = o->D;
    const R sc = (R)scale;
    for (int64_t k = 0; k < o->K; ++k) {
        const R* restrict fs = f_s[k];
        R* restrict gf = grad_f + k * B * D;
#pragma omp simd
        for (int64_t i = o->row_begin * D; i < o->row_end * D; ++i)
            gf[i] = sc * (fs[i] - f_t[i]) * (R)((fs[i] > 0) | (f_t[i] > 0));
    }
}

/* parts = (CE, KD, FEA) unweighted, total = ce_weight CE + kd_weight KD + feat_weight FEA; rows summed in order. */
void CAT(teskd_reduce, SUFFIX)(const teskd_options* o, const int64_t* target, const double* rows, R* total,
                               R* parts) {
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

#undef CAT
#undef CAT_
