"""The fused Triton TESKD loss on the host: launchers, custom ops and autograd wrappers of the kernels in
:mod:`.teskd_loss_jit` (where the derivation of the gradients is).

Eager mode goes through :class:`TESKDLossTritonFunction`, ``torch.compile`` through the custom ops
``teskd_fast::teskd_loss_fwd`` and ``teskd_fast::teskd_loss_bwd``. Each declares its inputs once, in its
signature: the gradients a backward returns are placed by input name (:func:`_gradients`), and the options
reach the kernels as a :class:`~teskd_fast.kernels.options.LossOptions` record, flattened only into the kernel's
scalar arguments (and, by field name, into the custom op's schema).
"""

import contextlib
import inspect

import torch
import triton

from .options import PARTS, SPEC, LossOptions
from .teskd_loss_jit import MAX_DIM, _teskd_bwd_kernel, _teskd_fwd_kernel, launch_config

__all__ = ["TESKDLossTritonFunction", "launch_config", "teskd_bwd", "teskd_fwd", "teskd_loss_triton"]

# The inputs that get a gradient, by name: the teacher logits, the stacked student logits and student features.
DIFFERENTIABLE = ("teacher", "students", "student_features")
BWD_BLOCK = 4096

# Allocators of every buffer a kernel writes; the tests swap in NaN-filled ones to catch unwritten elements.
_empty = torch.empty
_empty_like = torch.empty_like


def _input_names(fn, skip=0):
    """The parameter names of ``fn`` (after the first ``skip``): the one declaration of a Function's inputs."""
    return tuple(inspect.signature(fn).parameters)[skip:]


def _gradients(inputs, **grads):
    """The gradients for the inputs named ``inputs``, in their order: ``grads[name]``, None for every other."""
    unknown = set(grads) - set(DIFFERENTIABLE)
    if unknown:
        raise KeyError(f"gradients given for inputs that are not differentiable: {sorted(unknown)}")
    return tuple(grads.get(name) for name in inputs)


def _ticket(device):
    """A zeroed counter for one launch's reduction (one memset). A counter shared between calls would be broken by
    two CUDA graphs replayed concurrently, or by one allocated during a capture."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _on_device(device):
    """Launch on ``device`` (Triton launches on the current CUDA device, not on the tensors')."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grad_dtype(dtype):
    # float16 gradients are stored in float32 until grad_output (a loss scale, typically) has been applied:
    # 1e-7-sized feature gradients would be subnormal in float16. bfloat16 has float32's range.
    return torch.float32 if dtype == torch.float16 else dtype


def _check_sizes(B, C, D):
    for name, n in (("B", B), ("C", C), ("D", D)):
        if n > MAX_DIM:
            raise ValueError(
                f"backend='triton': {name} = {n} is larger than {MAX_DIM}, the most its kernels index within a row "
                f"(32-bit); use backend='torch'"
            )


def teskd_fwd(
    teacher,
    students,
    target,
    teacher_feature,
    student_features,
    head_weights,
    options,
    need_grad=True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (``head_weights``: K + 1 numbers, teacher first, passed to the kernel as scalars;
    ``options``: a :class:`~teskd_fast.kernels.options.LossOptions`); without ``need_grad`` the gradients are
    neither computed nor stored (their buffers are empty).

    Returns:
        total ``[]`` float32, parts ``[3]`` float32 (ce, kd, feat, unweighted), the logit gradients
        ``[K + 1, B, C]`` in the logits' dtype (teacher first) and the student-feature gradients ``[K, B, D]``
        in the features' dtype (empty without features).
    """
    K, B, C = students.shape
    has_feat = teacher_feature is not None
    D = teacher_feature.shape[1] if has_feat else 1
    _check_sizes(B, C, D)
    teacher = teacher.contiguous()
    students = students.contiguous()
    if target.dtype not in (torch.int32, torch.int64):
        target = target.long()
    target = target.contiguous()
    grad_shape = (K + 1, B, C) if need_grad else (K + 1, 0, C)
    grad = _empty(grad_shape, dtype=_grad_dtype(teacher.dtype), device=teacher.device)
    if has_feat:
        teacher_feature = teacher_feature.contiguous()
        student_features = student_features.contiguous()
        grad_feat = _empty_like(student_features if need_grad else student_features[:, :0],
                                dtype=_grad_dtype(student_features.dtype))  # fmt: skip
    else:
        teacher_feature = student_features = grad_feat = grad.new_empty((0,))
    partials = _empty((B, 4), dtype=torch.float32, device=teacher.device)
    total = _empty((), dtype=torch.float32, device=teacher.device)
    parts = _empty((len(PARTS),), dtype=torch.float32, device=teacher.device)

    BLOCK_K, BLOCK_C, BLOCK_D, BLOCK_B, num_warps = launch_config(K, B, C, D)
    # BLOCK_K + 1 scalars (the padded students' weights are 0): one compiled kernel per BLOCK_K, as in the tests.
    weights = tuple(float(w) for w in head_weights) + (0.0,) * (BLOCK_K - K)
    T = options.temperature
    with _on_device(teacher.device):
        _teskd_fwd_kernel[(B,)](
            t_ptr=teacher,
            s_ptr=students,
            y_ptr=target,
            w=weights,
            ft_ptr=teacher_feature,
            fs_ptr=student_features,
            gt_ptr=grad[0],
            gs_ptr=grad[1:],
            gf_ptr=grad_feat,
            part_ptr=partials,
            total_ptr=total,
            parts_ptr=parts,
            ticket_ptr=_ticket(teacher.device),
            B=B,
            C=C,
            D=D,
            K=K,
            s_t=teacher.stride(0),
            s_sk=students.stride(0),
            s_sb=students.stride(1),
            s_f=teacher_feature.stride(0) if has_feat else 0,
            s_fk=student_features.stride(0) if has_feat else 0,
            s_fb=student_features.stride(1) if has_feat else 0,
            # The options, each by its name in the specification (kernels/options.py).
            inv_T=1.0 / T,
            kd_scale=T / B,
            kd_loss_scale=T * T / B,
            eps=options.kd_eps,
            ls=options.label_smoothing,
            alpha=options.ce_weight,
            beta=options.kd_weight,
            gamma=options.feat_weight,
            ignore_index=options.ignore_index,
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


def teskd_bwd(grad_output, grad, grad_feat, logit_dtype, feat_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale the stored gradients by ``grad_output`` (a device scalar) in one launch, into the input dtypes."""
    scaled = _empty_like(grad, dtype=logit_dtype)
    scaled_feat = _empty_like(grad_feat, dtype=feat_dtype)
    n1, n2 = grad.numel(), grad_feat.numel()
    # The programs of the first buffer, counted here in Python integers: exact at any size.
    p1 = triton.cdiv(n1, BWD_BLOCK)
    grid = (p1 + triton.cdiv(n2, BWD_BLOCK),)
    with _on_device(grad.device):
        _teskd_bwd_kernel[grid](
            g_ptr=grad_output.contiguous(), x_ptr=grad, y_ptr=scaled, N1=n1,
            x2_ptr=grad_feat, y2_ptr=scaled_feat, N2=n2, P1=p1, BLOCK=BWD_BLOCK,
        )  # fmt: skip
    return scaled, scaled_feat


def _teskd_loss_fwd(
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
    # A custom op's schema takes plain scalars: the options' fields are named arguments of the op.
    # (The op runs eagerly, never traced: its arguments by name, every option of the specification.)
    given = locals()
    options = LossOptions(**{name: given[name] for name in LossOptions._fields})
    return teskd_fwd(teacher, students, target, teacher_feature, student_features, head_weights, options)


# The op's inputs, by name, in its schema's order (the options' fields last).
_OP_INPUTS = _input_names(_teskd_loss_fwd)
_OP_TENSORS = ("teacher", "students", "target", "teacher_feature", "student_features", "head_weights")


def check_op_options(spec=SPEC) -> None:
    """The custom op's inputs after its tensors are ``spec``'s options, by name, order and type: a RuntimeError
    names an option its schema lacks or misdeclares (called at import)."""
    parameters = inspect.signature(_teskd_loss_fwd).parameters
    names = tuple(option.name for option in spec)
    if _OP_INPUTS != (*_OP_TENSORS, *names):
        missing = [name for name in names if name not in _OP_INPUTS]
        extra = [name for name in _OP_INPUTS if name not in names and name not in _OP_TENSORS]
        raise RuntimeError(
            f"teskd_fast::teskd_loss_fwd's schema does not match the loss's options (kernels/options.py): "
            f"missing {missing}, not options {extra} (they follow the tensors, in the specification's order)"
        )
    for option in spec:
        if parameters[option.name].annotation is not option.type:
            raise RuntimeError(f"teskd_fast::teskd_loss_fwd: {option.name} is not declared {option.type.__name__}")


check_op_options()
_teskd_loss_fwd_op = torch.library.custom_op("teskd_fast::teskd_loss_fwd", mutates_args=())(_teskd_loss_fwd)


@_teskd_loss_fwd_op.register_fake
def _(teacher, students, target, teacher_feature, student_features, *args):
    K, B, C = students.shape
    if student_features is None:
        grad_feat = teacher.new_empty((0,), dtype=_grad_dtype(teacher.dtype))
    else:
        grad_feat = torch.empty_like(student_features, dtype=_grad_dtype(student_features.dtype))
    grad = teacher.new_empty((K + 1, B, C), dtype=_grad_dtype(teacher.dtype))
    total, parts = teacher.new_empty((), dtype=torch.float32), teacher.new_empty((len(PARTS),), dtype=torch.float32)
    return total, parts, grad, grad_feat


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
    named = dict(zip(_OP_INPUTS, inputs, strict=True))
    _, _, grad, grad_feat = output
    ctx.save_for_backward(grad, grad_feat)
    ctx.has_feat = named["student_features"] is not None
    ctx.dtypes = (named["teacher"].dtype, named["student_features"].dtype if ctx.has_feat else grad_feat.dtype)


def _backward(ctx, grad_total, grad_parts, grad_grad, grad_grad_feat):
    grad, grad_feat = ctx.saved_tensors
    if grad_total is None:
        return _gradients(_OP_INPUTS)
    scaled, scaled_feat = torch.ops.teskd_fast.teskd_loss_bwd(grad_total, grad, grad_feat, *ctx.dtypes)
    return _gradients(
        _OP_INPUTS, teacher=scaled[0], students=scaled[1:], student_features=scaled_feat if ctx.has_feat else None
    )


_teskd_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class TESKDLossTritonFunction(torch.autograd.Function):
    """Eager-mode autograd wrapper of the launchers: less host overhead than going through the custom ops."""

    @staticmethod
    def forward(
        ctx, teacher, students, target, teacher_feature, student_features, head_weights, options
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total, parts, grad, grad_feat = teskd_fwd(
            teacher, students, target, teacher_feature, student_features, head_weights, options
        )
        ctx.save_for_backward(grad, grad_feat)
        ctx.dtypes = (teacher.dtype, grad_feat.dtype if student_features is None else student_features.dtype)
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total, grad_parts) -> tuple[torch.Tensor | None, ...]:
        grad, grad_feat = ctx.saved_tensors
        with torch.no_grad():
            scaled, scaled_feat = teskd_bwd(grad_total, grad, grad_feat, *ctx.dtypes)
        needs = dict(zip(_FUNCTION_INPUTS, ctx.needs_input_grad, strict=True))
        return _refuse_second_order(_gradients(
            _FUNCTION_INPUTS,
            teacher=scaled[0],
            students=scaled[1:],
            student_features=scaled_feat if needs["student_features"] else None,
        ))  # fmt: skip


def _refuse_second_order(grads):
    """``grads`` as they are, or (in a backward with ``create_graph=True``) through a node that raises a clear error
    when they are differentiated in turn: the kernels' gradients are not differentiable (as ``once_differentiable``
    does, which says nothing where only the inputs of the loss, not grad_output, need a gradient)."""
    if not torch.is_grad_enabled():
        return grads
    error = torch._C._functions.DelayedError(
        b"teskd_loss(backend='triton') has no second-order gradients (its kernels' gradients are not differentiable); "
        b"use backend='torch' or 'reference' for double backward (create_graph=True)",
        1,
    )
    return tuple(None if g is None else error(g.detach().requires_grad_()) for g in grads)


# The Function's inputs, by name, in the order of its forward.
_FUNCTION_INPUTS = _input_names(TESKDLossTritonFunction.forward, skip=1)


def teskd_loss_triton(teacher, students, target, teacher_feature, student_features, head_weights,
                      options) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused TESKD loss (inputs validated by ``teskd_fast.teskd_loss``). Returns (total, detached parts).

    Eager mode goes through an autograd.Function; under ``torch.compile`` through the custom ops, which the
    compiler treats as opaque nodes (no graph break).
    """
    if torch.compiler.is_compiling():  # the custom op's outputs have fixed shapes: it always makes the gradients
        total, parts, _, _ = torch.ops.teskd_fast.teskd_loss_fwd(
            teacher, students, target, teacher_feature, student_features, list(head_weights), **options._asdict()
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
