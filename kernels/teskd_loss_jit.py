"""The fused Triton kernels of the TESKD loss and their tile sizes: two launches forward (the first is a 4-byte
memset), one backward. The launchers, custom ops and autograd wrappers are in :mod:`.teskd_loss`.

Per row b of the batch, with teacher logits z_t, K student logits z_k, temperature T, eps, B rows, C classes:

    P = softmax(z_t / T),  Q_k = softmax(z_k / T),  h_k = log(P + eps) - log Q_k
    KD_k = (T^2 / B) sum_j (P_j + eps) h_k,j
    d KD_k / d z_k = (T / B) (Q_k (1 + C eps) - (P + eps))              [d/dz_k of -(P+eps).log Q_k]
    d KD_k / d z_t = (T / B) P (h_k - sum_j P_j h_k,j)                    [d(P+eps)h/dP = h + 1; softmax Jacobian]
    CE_h = w_h (lse(z_h) - (1 - ls) z_h[y] - ls mean(z_h)) valid / n_valid
    d CE_h / d z_h = w_h (softmax(z_h) - (1 - ls) onehot(y) - ls / C) valid / n_valid
    FEA_k = sum_d (f_k - f_t)^2 [f_k > 0 or f_t > 0],   d FEA_k / d f_k = 2 (f_k - f_t) [mask]

The forward kernel runs one program per row. It streams the row in chunks of BLOCK_C classes (an online
softmax: C of any size), in three passes over the row: (1) running maxima and normalisers of every head at
temperatures 1 and T, (2) the KL sums and sum_j P_j h_k,j, (3) the gradients of all K + 1 logit rows, scaled
by alpha, beta and the CE normalisers, written once in the input dtype. The teacher's CE and K KD
contributions are summed in registers. Each program writes its row's partial losses; the last program to
finish (an atomic ticket) sums all partials in row order: deterministic, no host synchronisation.
The backward kernel multiplies the stored gradients by grad_output, read from device memory.

n_valid (targets that are neither ignore_index nor out of range) is counted by every program from the
target vector (B integers), so the CE normaliser needs no extra launch. Out-of-range targets are masked:
they never index memory and count like ignore_index.
"""

import triton
import triton.language as tl

MAX_TILE = 4096
MAX_FEATURE_TILE = 512
# B, C and D are indexed in 32 bits within a row (a loop counter plus one tile stays below 2^31); offsets
# across rows and students are 64-bit.
MAX_DIM = 2**31 - MAX_TILE


@triton.jit
def _class_tile(t_row, s_rows, i_c, C, m_k, inv_T, lseT_t, BLOCK_C: tl.constexpr):
    # Classes [i_c, i_c + BLOCK_C) of the row (passes 2 and 3): offsets, masks, the teacher's and the students'
    # logits in float32 and the teacher's softened probabilities P.
    o_c = i_c + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    m_kc = m_k[:, None] & m_c[None, :]
    b_t = tl.load(t_row + o_c, mask=m_c, other=-float("inf")).to(tl.float32)
    b_s = tl.load(s_rows + o_c[None, :], mask=m_kc, other=0.0).to(tl.float32)
    b_p = tl.exp(b_t * inv_T - lseT_t)
    return o_c, m_c, m_kc, b_t, b_s, b_p


@triton.jit
def _teskd_fwd_kernel(
    t_ptr,
    s_ptr,
    y_ptr,
    w,
    ft_ptr,
    fs_ptr,
    gt_ptr,
    gs_ptr,
    gf_ptr,
    part_ptr,
    total_ptr,
    parts_ptr,
    ticket_ptr,
    B,
    C,
    D,
    K,
    s_t,
    s_sk,
    s_sb,
    s_f,
    s_fk,
    s_fb,
    inv_T,
    kd_scale,
    kd_loss_scale,
    eps,
    ls,
    alpha,
    beta,
    gamma,
    ignore_index,
    HAS_FEAT: tl.constexpr,
    DETACH: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # Offsets in 64 bits: K * B * C or K * B * D elements may exceed 2^31. The loops are while loops: Triton's
    # interpreter (the CPU tests) passes a scalar argument as a 1-element array, which NumPy will not convert to a
    # range() bound; compiled, both lower to the same loop.
    i_b = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_k = o_k < K

    # CE normaliser: the number of valid targets in the batch.
    b_cnt = tl.zeros([BLOCK_B], dtype=tl.float32)
    i_0 = 0
    while i_0 < B:
        o_b = i_0 + tl.arange(0, BLOCK_B)
        b_yy = tl.load(y_ptr + o_b, mask=o_b < B, other=ignore_index)
        b_cnt += ((b_yy != ignore_index) & (b_yy >= 0) & (b_yy < C)).to(tl.float32)
        i_0 += BLOCK_B
    n_valid = tl.sum(b_cnt, axis=0)

    y = tl.load(y_ptr + i_b)
    valid = (y != ignore_index) & (y >= 0) & (y < C)
    y_safe = tl.where(valid, y, 0)
    ce_row_scale = tl.where(valid, 1.0, 0.0) / n_valid
    # The K + 1 head weights (teacher first) are scalar arguments: no buffer to copy to the device before a launch.
    w_t = w[0]
    b_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k in tl.static_range(1, len(w)):
        b_w = tl.where(o_k == k - 1, w[k], b_w)

    t_row = t_ptr + i_b * s_t
    s_rows = s_ptr + o_k[:, None] * s_sk + i_b * s_sb  # [BLOCK_K, 1]

    # Pass 1: running maxima and sums of exp at temperatures 1 and T, and sums of logits (label smoothing).
    m_t = -float("inf")
    l1_t = 0.0
    lT_t = 0.0
    sz_t = 0.0
    m_s = tl.full([BLOCK_K], -float("inf"), dtype=tl.float32)
    l1_s = tl.zeros([BLOCK_K], dtype=tl.float32)
    lT_s = tl.zeros([BLOCK_K], dtype=tl.float32)
    sz_s = tl.zeros([BLOCK_K], dtype=tl.float32)
    i_c = 0
    while i_c < C:
        o_c = i_c + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        b_t = tl.load(t_row + o_c, mask=m_c, other=-float("inf")).to(tl.float32)
        b_s = tl.load(s_rows + o_c[None, :], mask=m_k[:, None] & m_c[None, :], other=-float("inf")).to(tl.float32)
        # Padded students see zeros, so that their statistics stay finite (and unused).
        b_s = tl.where(m_k[:, None], b_s, 0.0)

        m_new = tl.maximum(m_t, tl.max(b_t, axis=0))
        l1_t = l1_t * tl.exp(m_t - m_new) + tl.sum(tl.exp(b_t - m_new), axis=0)
        lT_t = lT_t * tl.exp((m_t - m_new) * inv_T) + tl.sum(tl.exp((b_t - m_new) * inv_T), axis=0)
        sz_t += tl.sum(tl.where(m_c, b_t, 0.0), axis=0)
        m_t = m_new

        m_new_s = tl.maximum(m_s, tl.max(b_s, axis=1))
        l1_s = l1_s * tl.exp(m_s - m_new_s) + tl.sum(tl.exp(b_s - m_new_s[:, None]), axis=1)
        lT_s = lT_s * tl.exp((m_s - m_new_s) * inv_T) + tl.sum(tl.exp((b_s - m_new_s[:, None]) * inv_T), axis=1)
        sz_s += tl.sum(tl.where(m_c[None, :], b_s, 0.0), axis=1)
        m_s = m_new_s
        i_c += BLOCK_C

    # Log-normalisers: lse1 of z, lseT of z / T.
    lse1_t = m_t + tl.log(l1_t)
    lseT_t = m_t * inv_T + tl.log(lT_t)
    lse1_s = m_s + tl.log(l1_s)
    lseT_s = m_s * inv_T + tl.log(lT_s)

    # Cross-entropy of every head for this row.
    zy_t = tl.load(t_row + y_safe).to(tl.float32)
    zy_s = tl.load(s_rows + y_safe, mask=m_k[:, None], other=0.0).to(tl.float32)
    zy_s = tl.sum(zy_s, axis=1)
    ce_t = lse1_t - (1.0 - ls) * zy_t - ls * sz_t / C
    ce_s = lse1_s - (1.0 - ls) * zy_s - ls * sz_s / C
    ce_row = (w_t * ce_t + tl.sum(tl.where(m_k, b_w * ce_s, 0.0), axis=0)) * ce_row_scale

    # Pass 2: KL sums and A_k = sum_j P_j h_k,j.
    kl = tl.zeros([BLOCK_K], dtype=tl.float32)
    a_k = tl.zeros([BLOCK_K], dtype=tl.float32)
    i_c = 0
    while i_c < C:
        o_c, m_c, m_kc, b_t, b_s, b_p = _class_tile(t_row, s_rows, i_c, C, m_k, inv_T, lseT_t, BLOCK_C)
        b_pe = b_p + eps
        b_h = tl.where(m_kc, tl.log(b_pe)[None, :] - (b_s * inv_T - lseT_s[:, None]), 0.0)
        kl += tl.sum(b_pe[None, :] * b_h, axis=1)
        a_k += tl.sum(b_p[None, :] * b_h, axis=1)
        i_c += BLOCK_C
    kd_row = kd_loss_scale * tl.sum(kl, axis=0)

    # Pass 3: gradients of the K + 1 logit rows (none when no gradient is needed: an evaluation call).
    ce_scale = alpha * ce_row_scale
    if NEED_GRAD:
        i_c = 0
        while i_c < C:
            o_c, m_c, m_kc, b_t, b_s, b_p = _class_tile(t_row, s_rows, i_c, C, m_k, inv_T, lseT_t, BLOCK_C)
            b_y = tl.where(o_c == y_safe, 1.0 - ls, 0.0) + ls / C
            b_y = tl.where(valid, b_y, 0.0)
            b_pe = b_p + eps
            b_logq = b_s * inv_T - lseT_s[:, None]

            b_gt = (w_t * ce_scale) * (tl.exp(b_t - lse1_t) - b_y)
            if not DETACH:
                b_h = tl.where(m_kc, tl.log(b_pe)[None, :] - b_logq, 0.0)
                b_hsum = tl.sum(b_h - a_k[:, None], axis=0)
                b_gt += (beta * kd_scale) * b_p * b_hsum
            tl.store(gt_ptr + i_b * s_t + o_c, b_gt.to(gt_ptr.dtype.element_ty), mask=m_c)

            b_gs = (b_w[:, None] * ce_scale) * (tl.exp(b_s - lse1_s[:, None]) - b_y[None, :])
            b_gs += (beta * kd_scale) * (tl.exp(b_logq) * (1.0 + C * eps) - b_pe[None, :])
            o_gs = o_k[:, None] * s_sk + i_b * s_sb + o_c[None, :]
            tl.store(gs_ptr + o_gs, b_gs.to(gs_ptr.dtype.element_ty), mask=m_kc)
            i_c += BLOCK_C

    # Masked feature loss and its gradient.
    feat_row = 0.0
    if HAS_FEAT:
        b_fsum = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        i_d = 0
        while i_d < D:
            o_d = i_d + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            m_kd = m_k[:, None] & m_d[None, :]
            b_ft = tl.load(ft_ptr + i_b * s_f + o_d, mask=m_d, other=0.0).to(tl.float32)
            o_fs = o_k[:, None] * s_fk + i_b * s_fb + o_d[None, :]
            b_fs = tl.load(fs_ptr + o_fs, mask=m_kd, other=0.0).to(tl.float32)
            b_diff = tl.where(m_kd & ((b_fs > 0) | (b_ft[None, :] > 0)), b_fs - b_ft[None, :], 0.0)
            b_fsum += b_diff * b_diff
            if NEED_GRAD:
                tl.store(gf_ptr + o_fs, (2.0 * gamma * b_diff).to(gf_ptr.dtype.element_ty), mask=m_kd)
            i_d += BLOCK_D
        feat_row = tl.sum(tl.sum(b_fsum, axis=1), axis=0)

    o_p = part_ptr + i_b * 4
    tl.store(o_p + 0, alpha * ce_row + beta * kd_row + gamma * feat_row)
    tl.store(o_p + 1, ce_row)
    tl.store(o_p + 2, kd_row)
    tl.store(o_p + 3, feat_row)

    # The last program to finish sums the partials in row order. The ticket is this launch's own zeroed counter.
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == B - 1:
        b_acc = tl.zeros([BLOCK_B, 4], dtype=tl.float32)
        o_4 = tl.arange(0, 4)
        i_0 = 0
        while i_0 < B:
            o_b = i_0 + tl.arange(0, BLOCK_B).to(tl.int64)  # 4 B may exceed 2^31
            b_acc += tl.load(
                part_ptr + o_b[:, None] * 4 + o_4[None, :], mask=(o_b < B)[:, None], other=0.0, cache_modifier=".cg"
            )
            i_0 += BLOCK_B
        b_sum = tl.sum(b_acc, axis=0)  # [4]: total, ce, kd, feat
        tl.store(total_ptr + o_4 * 0, b_sum, mask=o_4 == 0)
        tl.store(parts_ptr + o_4 - 1, b_sum, mask=o_4 > 0)


@triton.jit
def _teskd_bwd_kernel(g_ptr, x_ptr, y_ptr, N1, x2_ptr, y2_ptr, N2, P1, BLOCK: tl.constexpr):
    # Two flat buffers in one launch: the logit gradients (N1 elements, the first P1 = cdiv(N1, BLOCK) programs),
    # then the feature gradients (N2). P1 comes from the host: N1 + BLOCK - 1 wraps in 32 bits for N1 near 2^31.
    i_p = tl.program_id(0).to(tl.int64)
    g = tl.load(g_ptr).to(tl.float32)
    if i_p < P1:
        o = i_p * BLOCK + tl.arange(0, BLOCK)
        m = o < N1
        b_x = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + o, (b_x * g).to(y_ptr.dtype.element_ty), mask=m)
    else:
        o = (i_p - P1) * BLOCK + tl.arange(0, BLOCK)
        m = o < N2
        b_x = tl.load(x2_ptr + o, mask=m, other=0.0).to(tl.float32)
        tl.store(y2_ptr + o, (b_x * g).to(y2_ptr.dtype.element_ty), mask=m)


# (BLOCK_K, BLOCK_C) pairs whose code spills registers on sm_90 with 4 and with 8 warps under a supported Triton
# release (ptxas' report): they take the next smaller class tile. And the pairs that spill with 8 warps only.
_SPILLING_TILES = {(1, 1024), (2, 1024), (8, 64), (32, 128)}
_FOUR_WARPS = {(4, 32), (4, 128), (16, 32)}


def launch_config(K, B, C, D) -> tuple[int, int, int, int, int]:
    """``(BLOCK_K, BLOCK_C, BLOCK_D, BLOCK_B, num_warps)`` of the forward kernel for K students, B rows, C classes
    and D features.

    A logit tile holds BLOCK_K x BLOCK_C values (at most MAX_TILE), a feature tile BLOCK_K x MAX_FEATURE_TILE / BLOCK_K
    values (at least 16 a student), the reductions over the batch 32 x num_warps rows. The configuration depends on
    K and C alone (a part-masked feature or batch tile costs little), so that the set of configurations is small
    enough for tests/test_package.py to compile every one for K <= 32 under each Triton release and assert that
    none spills registers. These bounds come from ptxas' reports for sm_90: larger logit tiles (8192 values) and
    feature tiles (1024 values) spill, and so do the pairs of ``_SPILLING_TILES`` and ``_FOUR_WARPS`` under one of
    the supported Triton releases. Their speed on a GPU is not measured yet.
    """
    BLOCK_K = triton.next_power_of_2(K)
    BLOCK_C = max(16, min(triton.next_power_of_2(C), MAX_TILE // BLOCK_K))
    if (BLOCK_K, BLOCK_C) in _SPILLING_TILES:
        BLOCK_C //= 2
    BLOCK_D = max(16, MAX_FEATURE_TILE // BLOCK_K)
    num_warps = 4 if (BLOCK_K, BLOCK_C) in _FOUR_WARPS else 8
    return BLOCK_K, BLOCK_C, BLOCK_D, 32 * num_warps, num_warps
