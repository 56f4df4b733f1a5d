"""Fused Triton kernels of the TESKD loss: two launches forward (the second is 4 bytes), one backward.

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

import contextlib

import torch
import triton
import triton.language as tl

from teskd_fast.loss.options import LossOptions

MAX_TILE = 4096
MAX_FEATURE_TILE = 512

# Allocators of every buffer a kernel writes; the tests swap in NaN-filled ones to catch unwritten elements.
_empty = torch.empty
_empty_like = torch.empty_like


@triton.jit
def _teskd_fwd_kernel(
    t_ptr,
    s_ptr,
    y_ptr,
    w_ptr,
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
    # Offsets in 64 bits: K * B * C or K * B * D elements may exceed 2^31.
    i_b = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_k = o_k < K

    # CE normaliser: the number of valid targets in the batch.
    b_cnt = tl.zeros([BLOCK_B], dtype=tl.float32)
    for i_0 in range(0, B, BLOCK_B):
        o_b = i_0 + tl.arange(0, BLOCK_B)
        b_yy = tl.load(y_ptr + o_b, mask=o_b < B, other=ignore_index)
        b_cnt += ((b_yy != ignore_index) & (b_yy >= 0) & (b_yy < C)).to(tl.float32)
    n_valid = tl.sum(b_cnt, axis=0)

    y = tl.load(y_ptr + i_b)
    valid = (y != ignore_index) & (y >= 0) & (y < C)
    y_safe = tl.where(valid, y, 0)
    ce_row_scale = tl.where(valid, 1.0, 0.0) / n_valid
    b_w = tl.load(w_ptr + 1 + o_k, mask=m_k, other=0.0)  # [BLOCK_K]
    w_t = tl.load(w_ptr)

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
    for i_c in range(0, C, BLOCK_C):
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
    for i_c in range(0, C, BLOCK_C):
        o_c = i_c + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        m_kc = m_k[:, None] & m_c[None, :]
        b_t = tl.load(t_row + o_c, mask=m_c, other=-float("inf")).to(tl.float32)
        b_s = tl.load(s_rows + o_c[None, :], mask=m_kc, other=0.0).to(tl.float32)
        b_p = tl.exp(b_t * inv_T - lseT_t)
        b_pe = b_p + eps
        b_h = tl.where(m_kc, tl.log(b_pe)[None, :] - (b_s * inv_T - lseT_s[:, None]), 0.0)
        kl += tl.sum(b_pe[None, :] * b_h, axis=1)
        a_k += tl.sum(b_p[None, :] * b_h, axis=1)
    kd_row = kd_loss_scale * tl.sum(kl, axis=0)

    # Pass 3: gradients of the K + 1 logit rows (none when no gradient is needed: an evaluation call).
    ce_scale = alpha * ce_row_scale
    for i_c in range(0, C if NEED_GRAD else 0, BLOCK_C):
        o_c = i_c + tl.arange(0, BLOCK_C)
        m_c = o_c < C
        m_kc = m_k[:, None] & m_c[None, :]
        b_t = tl.load(t_row + o_c, mask=m_c, other=-float("inf")).to(tl.float32)
        b_s = tl.load(s_rows + o_c[None, :], mask=m_kc, other=0.0).to(tl.float32)
        b_y = tl.where(o_c == y_safe, 1.0 - ls, 0.0) + ls / C
        b_y = tl.where(valid, b_y, 0.0)
        b_p = tl.exp(b_t * inv_T - lseT_t)
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
        tl.store(gs_ptr + o_k[:, None] * s_sk + i_b * s_sb + o_c[None, :], b_gs.to(gs_ptr.dtype.element_ty), mask=m_kc)

    # Masked feature loss and its gradient.
    feat_row = 0.0
    if HAS_FEAT:
        b_fsum = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for i_d in range(0, D, BLOCK_D):
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
        for i_0 in range(0, B, BLOCK_B):
            o_b = i_0 + tl.arange(0, BLOCK_B)
            b_acc += tl.load(
                part_ptr + o_b[:, None] * 4 + o_4[None, :], mask=(o_b < B)[:, None], other=0.0, cache_modifier=".cg"
            )
        b_sum = tl.sum(b_acc, axis=0)  # [4]: total, ce, kd, feat
        tl.store(total_ptr + o_4 * 0, b_sum, mask=o_4 == 0)
        tl.store(parts_ptr + o_4 - 1, b_sum, mask=o_4 > 0)


@triton.jit
def _teskd_bwd_kernel(g_ptr, x_ptr, y_ptr, N1, x2_ptr, y2_ptr, N2, BLOCK: tl.constexpr):
    # Two flat buffers in one launch: the logit gradients (N1 elements), then the feature gradients (N2).
    i_p = tl.program_id(0).to(tl.int64)
    n_1 = tl.cdiv(N1, BLOCK)
    g = tl.load(g_ptr).to(tl.float32)
    if i_p < n_1:
        o = i_p * BLOCK + tl.arange(0, BLOCK)
        m = o < N1
        b_x = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + o, (b_x * g).to(y_ptr.dtype.element_ty), mask=m)
    else:
        o = (i_p - n_1) * BLOCK + tl.arange(0, BLOCK)
        m = o < N2
        b_x = tl.load(x2_ptr + o, mask=m, other=0.0).to(tl.float32)
        tl.store(y2_ptr + o, (b_x * g).to(y2_ptr.dtype.element_ty), mask=m)


_WEIGHTS = {}


def _ticket(device):
    """A zeroed counter for one launch's reduction (one memset). A counter shared between calls would be broken by
    two CUDA graphs replayed concurrently, or by one allocated during a capture."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def launch_config(K, B, C, D):
    """``(BLOCK_K, BLOCK_C, BLOCK_D, BLOCK_B, num_warps)`` of the forward kernel for K students, B rows, C classes
    and D features.

    A logit tile holds BLOCK_K x BLOCK_C values (at most MAX_TILE), a feature tile BLOCK_K x BLOCK_D (at most
    MAX_FEATURE_TILE), the final reduction BLOCK_B x 4, with 4 or 8 warps. These bounds come from ptxas' report for
    sm_90: the earlier 8192-value tiles spilled registers (K = 1, 8192 classes: 8 bytes with 8 warps, 20 with 16;
    32 warps leave 64 registers a thread and spill hundreds of bytes for K >= 8), and so did 1024- and 2048-value
    feature tiles and a [1024, 4] reduction over 4 warps. tests/test_package.py compiles every configuration this
    function gives and asserts that none spills. Their speed on a GPU is not measured yet.
    """
    BLOCK_K = triton.next_power_of_2(K)
    BLOCK_C = max(16, min(triton.next_power_of_2(C), MAX_TILE // BLOCK_K))
    BLOCK_D = max(16, min(triton.next_power_of_2(D), MAX_FEATURE_TILE // BLOCK_K))
    tile = BLOCK_K * max(BLOCK_C, BLOCK_D)
    num_warps = min(8, max(4, tile // (8 * 32)))
    BLOCK_B = max(16, min(triton.next_power_of_2(B), 32 * num_warps, 1024))
    return BLOCK_K, BLOCK_C, BLOCK_D, BLOCK_B, num_warps


def _on_device(device):
    """Launch on ``device`` (Triton launches on the current CUDA device, not on the tensors')."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _head_weights(weights, device):
    key = (tuple(weights), str(device))
    if key not in _WEIGHTS:
        _WEIGHTS[key] = torch.tensor(weights, dtype=torch.float32, device=device)
    return _WEIGHTS[key]


def _grad_dtype(dtype):
    # float16 gradients are stored in float32 until grad_output (a loss scale, typically) has been applied:
    # 1e-7-sized feature gradients would be subnormal in float16. bfloat16 has float32's range.
    return torch.float32 if dtype == torch.float16 else dtype


def teskd_fwd(
    teacher,
    students,
    target,
    teacher_feature,
    student_features,
    head_weights,
    options,
    need_grad=True,
):
    """Launch the forward kernel (``options``: a :class:`~teskd_fast.loss.options.LossOptions`); without
    ``need_grad`` the gradients are neither computed nor stored (their buffers are empty).

    Returns:
        total ``[]`` float32, parts ``[3]`` float32 (ce, kd, feat, unweighted), the logit gradients
        ``[K + 1, B, C]`` in the logits' dtype (teacher first) and the student-feature gradients ``[K, B, D]``
        in the features' dtype (empty without features).
    """
    K, B, C = students.shape
    teacher = teacher.contiguous()
    students = students.contiguous()
    if target.dtype not in (torch.int32, torch.int64):
        target = target.long()
    target = target.contiguous()
    has_feat = teacher_feature is not None
    grad_shape = (K + 1, B, C) if need_grad else (K + 1, 0, C)
    grad = _empty(grad_shape, dtype=_grad_dtype(teacher.dtype), device=teacher.device)
    if has_feat:
        teacher_feature = teacher_feature.contiguous()
        student_features = student_features.contiguous()
        D = teacher_feature.shape[1]
        grad_feat = _empty_like(student_features if need_grad else student_features[:, :0],
                                dtype=_grad_dtype(student_features.dtype))  # fmt: skip
    else:
        D = 1
        teacher_feature = student_features = grad_feat = grad.new_empty((0,))
    partials = _empty((B, 4), dtype=torch.float32, device=teacher.device)
    total = _empty((), dtype=torch.float32, device=teacher.device)
    parts = _empty((3,), dtype=torch.float32, device=teacher.device)

    BLOCK_K, BLOCK_C, BLOCK_D, BLOCK_B, num_warps = launch_config(K, B, C, D)
    T = options.temperature
    with _on_device(teacher.device):
        _teskd_fwd_kernel[(B,)](
            teacher,
            students,
            target,
            _head_weights(head_weights, teacher.device),
            teacher_feature,
            student_features,
            grad[0],
            grad[1:],
            grad_feat,
            partials,
            total,
            parts,
            _ticket(teacher.device),
            B,
            C,
            D,
            K,
            teacher.stride(0),
            students.stride(0),
            students.stride(1),
            teacher_feature.stride(0) if has_feat else 0,
            student_features.stride(0) if has_feat else 0,
            student_features.stride(1) if has_feat else 0,
            1.0 / T,
            T / B,
            T * T / B,
            options.kd_eps,
            options.label_smoothing,
            options.ce_weight,
            options.kd_weight,
            options.feat_weight,
            options.ignore_index,
            HAS_FEAT=has_feat,
            DETACH=options.detach_teacher,
            NEED_GRAD=need_grad,
            BLOCK_K=BLOCK_K,
            BLOCK_C=BLOCK_C,
            BLOCK_D=BLOCK_D,
            BLOCK_B=BLOCK_B,
            num_warps=num_warps,
        )
    return total, parts, grad, grad_feat


def teskd_bwd(grad_output, grad, grad_feat, logit_dtype, feat_dtype):
    """Scale the stored gradients by ``grad_output`` (a device scalar) in one launch, into the input dtypes."""
    scaled = _empty_like(grad, dtype=logit_dtype)
    scaled_feat = _empty_like(grad_feat, dtype=feat_dtype)
    BLOCK = 4096
    n1, n2 = grad.numel(), grad_feat.numel()
    grid = (triton.cdiv(n1, BLOCK) + triton.cdiv(n2, BLOCK),)
    with _on_device(grad.device):
        _teskd_bwd_kernel[grid](grad_output.contiguous(), grad, scaled, n1, grad_feat, scaled_feat, n2, BLOCK=BLOCK)
    return scaled, scaled_feat


@torch.library.custom_op("teskd_fast::teskd_loss_fwd", mutates_args=())
def _teskd_loss_fwd_op(
    teacher: torch.Tensor,
    students: torch.Tensor,
    target: torch.Tensor,
    teacher_feature: torch.Tensor | None,
    student_features: torch.Tensor | None,
    head_weights: list[float],
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    feat_weight: float,
    kd_eps: float,
    detach_teacher: bool,
    label_smoothing: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # A custom op's schema takes plain scalars: the options are unpacked at this boundary only.
    options = LossOptions(
        temperature, ce_weight, kd_weight, feat_weight, kd_eps, detach_teacher, label_smoothing, ignore_index
    )
    return teskd_fwd(teacher, students, target, teacher_feature, student_features, head_weights, options)


@_teskd_loss_fwd_op.register_fake
def _(teacher, students, target, teacher_feature, student_features, *args):
    K, B, C = students.shape
    if student_features is None:
        grad_feat = teacher.new_empty((0,), dtype=_grad_dtype(teacher.dtype))
    else:
        grad_feat = torch.empty_like(student_features, dtype=_grad_dtype(student_features.dtype))
    grad = teacher.new_empty((K + 1, B, C), dtype=_grad_dtype(teacher.dtype))
    return teacher.new_empty((), dtype=torch.float32), teacher.new_empty((3,), dtype=torch.float32), grad, grad_feat


@torch.library.custom_op("teskd_fast::teskd_loss_bwd", mutates_args=())
def _teskd_loss_bwd_op(
    grad_output: torch.Tensor,
    grad: torch.Tensor,
    grad_feat: torch.Tensor,
    logit_dtype: torch.dtype,
    feat_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return teskd_bwd(grad_output, grad, grad_feat, logit_dtype, feat_dtype)


@_teskd_loss_bwd_op.register_fake
def _(grad_output, grad, grad_feat, logit_dtype, feat_dtype):
    return torch.empty_like(grad, dtype=logit_dtype), torch.empty_like(grad_feat, dtype=feat_dtype)


def _setup_context(ctx, inputs, output):
    _, _, grad, grad_feat = output
    ctx.save_for_backward(grad, grad_feat)
    ctx.has_feat = inputs[4] is not None
    ctx.dtypes = (inputs[0].dtype, inputs[4].dtype if ctx.has_feat else grad_feat.dtype)


def _backward(ctx, grad_total, grad_parts, grad_grad, grad_grad_feat):
    grad, grad_feat = ctx.saved_tensors
    if grad_total is None:
        return (None,) * 14
    scaled, scaled_feat = torch.ops.teskd_fast.teskd_loss_bwd(grad_total, grad, grad_feat, *ctx.dtypes)
    return (scaled[0], scaled[1:], None, None, scaled_feat if ctx.has_feat else None) + (None,) * 9


_teskd_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class TESKDLossTritonFunction(torch.autograd.Function):
    """Eager-mode autograd wrapper of the launchers: less host overhead than going through the custom ops."""

    @staticmethod
    def forward(ctx, teacher, students, target, teacher_feature, student_features, head_weights, options):
        total, parts, grad, grad_feat = teskd_fwd(
            teacher, students, target, teacher_feature, student_features, head_weights, options
        )
        ctx.save_for_backward(grad, grad_feat)
        ctx.dtypes = (teacher.dtype, grad_feat.dtype if student_features is None else student_features.dtype)
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_parts):
        grad, grad_feat = ctx.saved_tensors
        scaled, scaled_feat = teskd_bwd(grad_total, grad, grad_feat, *ctx.dtypes)
        has_feat = ctx.needs_input_grad[4]
        return scaled[0], scaled[1:], None, None, scaled_feat if has_feat else None, None, None


def teskd_loss_triton(
    teacher,
    students,
    target,
    teacher_feature,
    student_features,
    head_weights,
    options,
):
    """The fused TESKD loss (inputs validated by ``teskd_fast.teskd_loss``). Returns (total, detached parts).

    Eager mode goes through an autograd.Function; under ``torch.compile`` through the custom ops, which the
    compiler treats as opaque nodes (no graph break).
    """
    if torch.compiler.is_compiling():  # the custom op's outputs have fixed shapes: it always makes the gradients
        total, parts, _, _ = torch.ops.teskd_fast.teskd_loss_fwd(
            teacher, students, target, teacher_feature, student_features, list(head_weights), *options
        )
        return total, parts.detach()
    inputs = (teacher, students) if student_features is None else (teacher, students, student_features)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        # An evaluation call: the loss alone, no gradient computed or stored.
        total, parts, _, _ = teskd_fwd(
            teacher, students, target, teacher_feature, student_features, head_weights, options, need_grad=False
        )
        return total, parts
    return TESKDLossTritonFunction.apply(
        teacher, students, target, teacher_feature, student_features, head_weights, options
    )
