"""The TESKD loss with closed-form gradients (``backend="torch"``): the CPU fast path, in two autograd Functions.

The forward computes the loss and the gradient of every input at once (docs/method.md, "Loss"):

    d CE_h / d z_h  = w_h (softmax(z_h) - y_smooth) * valid / n_valid
    d KD_k / d z_k  = (T / B) (Q_k (1 + C eps) - (P + eps))
    d KD_k / d z_t  = (T / B) P (h_k - sum_j P_j h_k,j),   h_k = log(P + eps) - log Q_k
    d FEA_k / d f_k = 2 (f_k - f_t) mask

and the backward scales the stored gradients by grad_output.

- :class:`FusedLossFunction`: on the CPU outside ``torch.compile``, the fused C kernel of
  :mod:`teskd_fast.kernels.teskd_loss_cpu`, one pass per row over all heads;
- :class:`BatchedLossFunction`: the same closed form over batched ops (all K + 1 heads stacked into one
  ``[K + 1, B, C]`` tensor, one op per step for every head): where no C compiler is found, on other devices, and
  what ``torch.compile`` traces.

Both share :func:`_input_grads` (the stored gradients, scaled, in each input's dtype) and
:func:`_differentiable_grads`: a backward that builds a graph (``create_graph=True``, for second-order gradients)
takes the gradients from the reference composition's autograd instead, so that they are differentiable again and
double backward is exact. Inputs may mix floating dtypes (autocast): the arithmetic runs in float32, float64
where any input is float64, and every gradient comes back in its input's dtype.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch

from teskd_fast.kernels import teskd_loss_cpu as cpu_kernel

from .options import LossOptions
from .reference import accumulation_dtype, teskd_loss_reference

_CONSTANTS = {}


def _constant(values, dtype, device):
    """A small constant tensor, made once per (values, dtype, device)."""
    key = (values, dtype, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


def use_fused(device: torch.device) -> bool:
    """Whether the torch backend runs the fused CPU kernel for tensors on ``device``."""
    return device.type == "cpu" and not torch.compiler.is_compiling() and cpu_kernel.enabled()


class Layout(NamedTuple):
    """How the K students enter the Functions: their logits as one stacked ``[K, B, C]`` tensor or as K ``[B, C]``
    tensors, their features (when given) as one ``[K, B, D]`` tensor or as K ``[B, D]`` tensors.

    Each form enters as given, so that lists are never stacked and a stacked tensor gets its gradient as one block
    (no unbind, no stack in autograd)."""

    K: int
    stacked_logits: bool
    stacked_features: bool

    def split(self, values: Sequence) -> tuple["Args", tuple, tuple]:
        """``values`` in the Functions' input order (their inputs, or ``ctx.needs_input_grad``) ->
        ``(Args, students, student_features)``: the named leading arguments, then the tensors holding the student
        logits (one or K) and those holding the student features (none, one or K), as tuples."""
        n_logits = 1 if self.stacked_logits else self.K
        return (
            Args(*values[:_N_ARGS]),
            tuple(values[_N_ARGS : _N_ARGS + n_logits]),
            tuple(values[_N_ARGS + n_logits :]),
        )


class Args(NamedTuple):
    """The leading inputs of both Functions, in order; the students' logits, then their features, follow as
    :class:`Layout` says. Of these only ``teacher`` is differentiable (``teacher_feature`` is detached, as in the
    method)."""

    teacher: torch.Tensor  # [B, C]
    target: torch.Tensor  # [B] int64
    teacher_feature: torch.Tensor | None  # [B, D]
    head_weights: tuple[float, ...]
    options: LossOptions
    layout: Layout


_N_ARGS = len(Args._fields)
_NO_GRADS = Args(*(None,) * _N_ARGS)


def closed_form_loss(
    teacher: torch.Tensor,
    students: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    teacher_feature: torch.Tensor | None,
    student_features: torch.Tensor | Sequence[torch.Tensor] | None,
    head_weights: tuple[float, ...],
    options: LossOptions,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss through :class:`FusedLossFunction` (``fused``: see :func:`use_fused`) or
    :class:`BatchedLossFunction`; inputs validated by :func:`teskd_fast.teskd_loss`.

    ``students`` and ``student_features``: one stacked tensor or K tensors each (see :class:`Layout`); ``target``
    int64. Returns ``(total, parts)``, ``parts`` the detached ``[3]`` (ce, kd, feat)."""
    layout = Layout(len(students), isinstance(students, torch.Tensor), isinstance(student_features, torch.Tensor))
    logits = (students,) if layout.stacked_logits else tuple(students)
    if student_features is None:
        features = ()
    else:
        features = (student_features,) if layout.stacked_features else tuple(student_features)
    args = Args(teacher, target, teacher_feature, head_weights, options, layout)
    function = FusedLossFunction if fused else BatchedLossFunction
    return function.apply(*args, *logits, *features)


def _save_inputs(ctx, inputs):
    """What both backwards need of the inputs: their layout and dtypes, and (for a backward that builds a graph,
    see :func:`_differentiable_grads`) the inputs themselves with their versions."""
    args, students, features = Args(*inputs[:_N_ARGS]).layout.split(inputs)
    ctx.layout = args.layout
    ctx.dtypes = [t.dtype for t in (args.teacher, *students, *features)]
    # Kept as attributes, not saved tensors: a first-order backward neither needs them nor checks their versions.
    # (Not under torch.compile, which refuses double backward itself.)
    compiling = torch.compiler.is_compiling()
    ctx.inputs = None if compiling else inputs
    ctx.versions = None if compiling else [t._version for t in (args.teacher, args.target, *students, *features)]
    # The logits-only case has no gradient for the non-differentiable parts to materialise.
    ctx.set_materialize_grads(False)


def _input_grads(ctx, grad, grad_feat):
    """The Function's gradients: ``grad`` ``[K + 1, B, C]`` (teacher first) and ``grad_feat`` ``[K, B, D]`` (or
    None), already scaled by grad_output, split over the inputs as given and cast to each input's dtype."""
    layout = ctx.layout
    needs, needs_students, needs_features = layout.split(ctx.needs_input_grad)
    t_dtype, *dtypes = ctx.dtypes
    s_dtypes, f_dtypes = dtypes[: len(needs_students)], dtypes[len(needs_students) :]
    grad_teacher = grad[0].to(t_dtype) if needs.teacher else None
    rows = (grad[1:],) if layout.stacked_logits else grad[1:].unbind(0)
    grad_students = [g.to(d) if need else None for g, d, need in zip(rows, s_dtypes, needs_students, strict=True)]
    grad_features = [None] * len(needs_features)
    if grad_feat is not None and any(needs_features):
        rows = (grad_feat,) if layout.stacked_features else grad_feat.unbind(0)
        grad_features = [g.to(d) if need else None for g, d, need in zip(rows, f_dtypes, needs_features, strict=True)]
    # Only the teacher's logits among the named arguments take a gradient.
    return *_NO_GRADS._replace(teacher=grad_teacher), *grad_students, *grad_features


def _differentiable_grads(ctx, grad_total):
    """The gradients as a differentiable function of the inputs and of ``grad_total`` (a backward with
    ``create_graph=True``): autograd of :func:`~teskd_fast.loss.reference.teskd_loss_reference`, whose own
    gradients are exact, so that second (and higher) derivatives are too."""
    inputs = ctx.inputs
    args, students, features = ctx.layout.split(inputs)
    if [t._version for t in (args.teacher, args.target, *students, *features)] != ctx.versions:
        raise RuntimeError(
            "teskd_loss: the logits, student features or target were modified in place after the forward; a "
            "backward with create_graph=True needs them unchanged"
        )
    needs = ctx.needs_input_grad
    logits = students[0].unbind(0) if ctx.layout.stacked_logits else students
    feats = None
    if args.teacher_feature is not None:
        feats = features[0].unbind(0) if ctx.layout.stacked_features else features
    with torch.enable_grad():
        total = teskd_loss_reference(
            args.teacher, logits, args.target, args.teacher_feature, feats, args.head_weights, args.options
        )[0]
        wanted = [i for i, need in enumerate(needs) if need]
        grads = torch.autograd.grad(
            total, [inputs[i] for i in wanted], grad_total, create_graph=True, allow_unused=True
        )
    out = [None] * len(inputs)
    for i, g in zip(wanted, grads, strict=True):
        out[i] = g
    return tuple(out)


class FusedLossFunction(torch.autograd.Function):
    """The closed form by the fused C kernel (CPU tensors, eager mode, kernel built: see :func:`use_fused`).

    ``apply(*Args(...), *students, *student_features)`` (see :class:`Args` and :class:`Layout`; called through
    :func:`closed_form_loss`). Returns ``(total, parts)``."""

    @staticmethod
    def forward(ctx, *inputs):
        _save_inputs(ctx, inputs)
        args, students, student_features = Args(*inputs[:_N_ARGS]).layout.split(inputs)
        layout, options = args.layout, args.options
        acc = accumulation_dtype(args.teacher, *students, *student_features)
        # One dtype for the kernel: the inputs as they are where they already are contiguous in it.
        cast = [
            t if t.dtype == acc and t.is_contiguous() else t.to(acc).contiguous()
            for t in (args.teacher, *students, *student_features)
        ]
        n = len(students)
        c_teacher, c_students, c_features = cast[0], cast[1 : n + 1], cast[n + 1 :]
        f_t = None if args.teacher_feature is None else args.teacher_feature.to(acc).contiguous()
        # K [B, ...] tensors, or one contiguous [K, B, ...] tensor: the kernel takes K pointers either way.
        kernel_students = c_students[0] if layout.stacked_logits else c_students
        kernel_features = None if f_t is None else (c_features[0] if layout.stacked_features else c_features)
        kernel_args = (c_teacher, kernel_students, args.target.contiguous(), f_t, kernel_features, args.head_weights)
        # The feature gradient comes from the same pass when a student feature needs it (reading the features
        # once). The first backward hands these buffers out as the gradients (scaled in place); a second one
        # (retain_graph=True) recomputes them from the inputs, checked unmodified.
        with_feature_grad = f_t is not None and any(layout.split(ctx.needs_input_grad)[2])
        total, parts, grad, *grad_feat = cpu_kernel.fused_loss(*kernel_args, options, with_feature_grad)
        ctx.feat_scale, ctx.grad = 2.0 * options.feat_weight, grad
        ctx.grad_feat = grad_feat[0] if grad_feat else None
        ctx.kernel = (kernel_args, options, cast, [t._version for t in (*cast, kernel_args[2])])
        ctx.save_for_backward(*(() if f_t is None else (f_t, *c_features)))
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total, grad_parts):
        if grad_total is None:  # no gradient flows into the total (the parts have none)
            return (None,) * len(ctx.needs_input_grad)
        if torch.is_grad_enabled() and ctx.inputs is not None:
            return _differentiable_grads(ctx, grad_total)
        feats = ctx.saved_tensors
        g = float(grad_total)
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward through this graph
            grad = FusedLossFunction._recompute(ctx)
        if g != 1.0:
            cpu_kernel.scale_(grad, g)
        grad_feat = None
        if feats and any(ctx.layout.split(ctx.needs_input_grad)[2]):
            # From the forward's pass, else (a second backward) from the saved features, alike.
            grad_feat, ctx.grad_feat = ctx.grad_feat, None
            if grad_feat is None:
                student_features = feats[1] if ctx.layout.stacked_features else feats[1:]
                grad_feat = cpu_kernel.feature_grad(feats[0], student_features, ctx.feat_scale)
            if g != 1.0:
                cpu_kernel.scale_(grad_feat, g)
        return _input_grads(ctx, grad, grad_feat)

    @staticmethod
    def _recompute(ctx):
        """The unscaled logit gradients again, from the inputs of the forward (for a second backward)."""
        kernel_args, options, cast, versions = ctx.kernel
        if [t._version for t in (*cast, kernel_args[2])] != versions:
            raise RuntimeError(
                "teskd_loss: the logits, student features or target were modified in place after the forward; a "
                "second backward through this graph (retain_graph=True) needs them unchanged"
            )
        return cpu_kernel.fused_loss(*kernel_args, options)[2]


def _batched_forward(teacher, students, target, teacher_feature, student_features, head_weights, options, layout):
    """The loss and its closed-form gradients over batched ops: ``(total, parts, grad, grad_feat)``, ``grad`` the
    ``[K + 1, B, C]`` logit gradients (teacher first), ``grad_feat`` the ``[K, B, D]`` student-feature gradients
    (None without features), both unscaled by grad_output, in the accumulation dtype."""
    K = layout.K
    acc = accumulation_dtype(teacher, *students, *student_features)
    B, C = teacher.shape
    T, label_smoothing, kd_eps = options.temperature, options.label_smoothing, options.kd_eps
    ce_weight, kd_weight, feat_weight = options.ce_weight, options.kd_weight, options.feat_weight
    # [K+1, B, C], ours to overwrite
    if layout.stacked_logits:
        z = torch.cat([teacher.unsqueeze(0), students[0]])
    else:
        z = torch.stack([teacher, *students])
    if z.dtype != acc:
        z = z.to(acc)

    # Softmaxes of every head at temperature 1, then T, in place of the logits. A softmax is one fused pass;
    # the log-normalisers follow from the maximum: lse = max(z) - log(max(softmax(z))).
    y = target.clamp(0, C - 1).view(1, B, 1).expand(K + 1, B, 1)
    z_y = z.gather(-1, y).view(K + 1, B)
    z_mean = z.mean(-1) if label_smoothing > 0 else None
    z_max = z.amax(-1)  # [K+1, B]
    grad = torch.softmax(z, -1)  # becomes the gradient of all K + 1 logit rows
    lse = z_max - grad.amax(-1).log_()
    p_t = torch.softmax(z.mul_(1.0 / T), -1)  # z now holds z / T
    lse_t = z_max.mul_(1.0 / T).sub_(p_t.amax(-1).log_())

    # Cross-entropy of every head, PyTorch's semantics for ignore_index and label smoothing. Ignored rows
    # (and out-of-range targets, rejected upstream in eager mode) read an in-range index with weight 0.
    valid = target != options.ignore_index
    row_scale = valid.to(acc)
    row_scale /= row_scale.sum()  # [B]
    nll = lse - z_y  # [K+1, B]
    if label_smoothing > 0:
        nll = torch.lerp(nll, lse - z_mean, label_smoothing)
    nll = nll.masked_fill(~valid, 0.0)  # ignored rows add nothing, even non-finite ones (as in PyTorch)
    if all(w == head_weights[0] for w in head_weights):
        ce = torch.dot(nll.sum(0), row_scale) * head_weights[0]
        coef = (row_scale * (ce_weight * head_weights[0])).view(1, B, 1)
    else:
        w = torch.tensor(head_weights, dtype=acc, device=z.device)
        ce = torch.dot(nll @ row_scale, w)
        coef = torch.outer(w * ce_weight, row_scale).view(K + 1, B, 1)
    grad.scatter_add_(-1, y, torch.full_like(y, label_smoothing - 1, dtype=acc))
    if label_smoothing > 0:
        grad.sub_(label_smoothing / C)
    grad.mul_(coef)

    # Knowledge distillation from the teacher into every student, at temperature T.
    p = p_t[0]  # [B, C]
    p_eps = p + kd_eps
    # sum_k h_k = K log(P + eps) - sum_k log Q_k,  log Q_k = z_k / T - lse_t,k.
    h_sum = torch.log(p_eps).mul_(K).sub_(z[1:].sum(0)).add_(lse_t[1:].sum(0).unsqueeze(-1))
    kd = torch.dot(p_eps.view(-1), h_sum.view(-1)) * (T * T / B)
    scale = kd_weight * T / B
    grad[1:].add_(p_t[1:], alpha=scale * (1 + C * kd_eps)).sub_(p_eps, alpha=scale)
    if not options.detach_teacher:
        # sum_k (h_k - A_k), A_k = sum_j P_j h_k,j.
        grad[0].addcmul_(p, h_sum - (p * h_sum).sum(-1, keepdim=True), value=scale)

    # Masked squared error of the student features against the detached teacher feature.
    if teacher_feature is not None:
        f_t = teacher_feature if teacher_feature.dtype == acc else teacher_feature.to(acc)
        f_s = student_features[0] if layout.stacked_features else torch.stack(student_features, 0)
        f_s = f_s if f_s.dtype == acc else f_s.to(acc)
        # [f_s > 0 or f_t > 0] as a float 0/1 mask: float ops are several times faster than bool ones on CPUs.
        mask = torch.maximum(f_s, f_t).gt_(0)
        # [K, B, D], laid out as f_s is (a stacked feature may be non-contiguous: reshape copies it then)
        diff = (f_s - f_t).mul_(mask)
        flat = diff.reshape(-1)
        feat = torch.dot(flat, flat)
        grad_feat = diff * (2 * feat_weight)
    else:
        feat = kd.new_zeros(())
        grad_feat = None

    parts = torch.stack([ce, kd, feat])
    total = torch.dot(parts, _constant((ce_weight, kd_weight, feat_weight), acc, z.device))
    return total, parts, grad, grad_feat


class BatchedLossFunction(torch.autograd.Function):
    """The closed form over batched PyTorch ops (:func:`_batched_forward`): where the fused kernel does not run.

    ``apply(*Args(...), *students, *student_features)`` (see :class:`Args` and :class:`Layout`; called through
    :func:`closed_form_loss`). Returns ``(total, parts)``."""

    @staticmethod
    def forward(ctx, *inputs):
        _save_inputs(ctx, inputs)
        args, students, student_features = Args(*inputs[:_N_ARGS]).layout.split(inputs)
        total, parts, grad, grad_feat = _batched_forward(
            args.teacher, students, args.target, args.teacher_feature, student_features, args.head_weights,
            args.options, args.layout,
        )  # fmt: skip
        ctx.save_for_backward(grad, *(() if grad_feat is None else (grad_feat,)))
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total, grad_parts):
        if grad_total is None:  # no gradient flows into the total (the parts have none)
            return (None,) * len(ctx.needs_input_grad)
        if torch.is_grad_enabled() and ctx.inputs is not None:
            return _differentiable_grads(ctx, grad_total)
        grad, *grad_feat = ctx.saved_tensors
        return _input_grads(ctx, grad * grad_total, grad_feat[0] * grad_total if grad_feat else None)
