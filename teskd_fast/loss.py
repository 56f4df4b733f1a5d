"""The TESKD loss: one function, one module, three backends.

``teskd_loss`` validates its inputs (clear errors naming the argument, shapes and dtypes) and dispatches to

- ``"reference"``: :mod:`teskd_fast.naive`, the plain PyTorch composition (the oracle);
- ``"torch"``: :mod:`teskd_fast.closed_form`, closed-form gradients over batched ops (the CPU fast path);
- ``"triton"``: ``teskd_fast.kernels.teskd_loss``, fused Triton kernels (CUDA; or the CPU under
  ``TRITON_INTERPRET=1``);
- ``"auto"``: triton for CUDA tensors, torch elsewhere.
"""

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from teskd_fast import cpu_kernel
from teskd_fast.closed_form import TESKDLossFunction, use_fused
from teskd_fast.naive import teskd_loss_naive
from teskd_fast.outputs import TESKDOutput

BACKENDS = ("auto", "reference", "torch", "triton")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _shape(t):
    return tuple(t.shape)


def _heads(name, value, expect_rank):
    """A sequence of K tensors, or one tensor with a leading K dimension -> :class:`_Heads`.

    Lists are not stacked here: the torch backend takes the K tensors as they are (no copy); the others stack.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != expect_rank + 1:
            raise ValueError(
                f"{name}: expected a [K, B, {'C' if name == 'student_logits' else 'D'}] tensor or a sequence of K "
                f"tensors, got a tensor of shape {_shape(value)}"
            )
        return _Heads(value, value.unbind(0))
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name}: K = 0 students; TESKD needs at least one student")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
    shape, dtype = value[0].shape, value[0].dtype
    if any(t.shape != shape for t in value):
        raise ValueError(f"{name}: the K tensors differ in shape: {[_shape(t) for t in value]}")
    if any(t.dtype != dtype for t in value):
        raise TypeError(f"{name}: the K tensors differ in dtype: {[t.dtype for t in value]}")
    return _Heads(None, tuple(value))


class _Heads:
    """K per-student tensors, with the stacked ``[K, ...]`` form made on demand (once)."""

    def __init__(self, stacked, tensors):
        self._stacked, self.tensors = stacked, tensors

    def __len__(self):
        return len(self.tensors)

    @property
    def stacked(self):
        if self._stacked is None:
            self._stacked = torch.stack(self.tensors, 0)
        return self._stacked

    @property
    def shape(self):
        return (len(self.tensors), *self.tensors[0].shape)

    @property
    def dtype(self):
        return self.tensors[0].dtype


def _flat_feature(t):
    """``[B, D]`` or ``[B, D, 1, 1]`` -> ``[B, D]`` (and ``[K, B, D, 1, 1]`` -> ``[K, B, D]``)."""
    if t.dim() >= 4 and t.shape[-1] == 1 and t.shape[-2] == 1:
        return t.flatten(-3)
    return t


def _check_target_range(target, num_classes, ignore_index):
    low, high = torch.aminmax(target)
    if int(low) >= 0 and int(high) < num_classes:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bad.any():
        raise cpu_kernel.target_error(target, int(bad.nonzero()[0, 0]), num_classes, ignore_index)


def _validate(
    teacher_logits, student_logits, target, teacher_feature, student_features, head_weights, options, backend
):
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError(f"teacher_logits: expected a tensor, got {type(teacher_logits).__name__}")
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits: expected [B, C], got shape {_shape(teacher_logits)}")
    B, C = teacher_logits.shape
    if B < 1:
        raise ValueError(f"teacher_logits: empty batch, shape {_shape(teacher_logits)}")
    if C < 2:
        raise ValueError(f"teacher_logits: need at least 2 classes, got C = {C} (shape {_shape(teacher_logits)})")
    if teacher_logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(
            f"teacher_logits: dtype {teacher_logits.dtype} is not one of float32, bfloat16, float16, float64"
        )

    students = _heads("student_logits", student_logits, 2)
    K = students.shape[0]
    if K == 0:
        raise ValueError("student_logits: K = 0 students; TESKD needs at least one student")
    if students.shape[1:] != teacher_logits.shape:
        raise ValueError(
            f"student_logits: each student must match teacher_logits [B, C] = {[B, C]}, "
            f"got student shape {list(students.shape[1:])} (K = {K})"
        )
    if students.dtype != teacher_logits.dtype:
        raise TypeError(
            f"student_logits: dtype {students.dtype} differs from teacher_logits dtype {teacher_logits.dtype}"
        )

    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target: expected integer class indices, got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != B:
        raise ValueError(f"target: expected shape [B] = [{B}], got {_shape(target)}")

    device = teacher_logits.device
    tensors = {"student_logits": students, "target": target}

    if (teacher_feature is None) != (student_features is None):
        raise ValueError("teacher_feature and student_features: give both or neither")
    feats = None
    if teacher_feature is not None:
        if not isinstance(teacher_feature, torch.Tensor):
            raise TypeError(f"teacher_feature: expected a tensor, got {type(teacher_feature).__name__}")
        f_t = _flat_feature(teacher_feature)
        if f_t.dim() != 2 or f_t.shape[0] != B:
            raise ValueError(
                f"teacher_feature: expected [B, D] or [B, D, 1, 1] with B = {B}, got {_shape(teacher_feature)}"
            )
        if isinstance(student_features, torch.Tensor):
            f_s = _flat_feature(student_features)
        else:
            if isinstance(student_features, Sequence) and not isinstance(student_features, str):
                student_features = [
                    _flat_feature(f) if isinstance(f, torch.Tensor) else f for f in student_features
                ]
            f_s = student_features
        f_s = _heads("student_features", f_s, 2)
        if f_s.shape[0] != K:
            raise ValueError(f"student_features: {f_s.shape[0]} students, but student_logits has K = {K}")
        if f_s.shape[1:] != f_t.shape:
            raise ValueError(
                f"student_features: each student feature must match teacher_feature [B, D] = {list(f_t.shape)}, "
                f"got {list(f_s.shape[1:])}"
            )
        for name, t in (("teacher_feature", f_t), ("student_features", f_s)):
            if t.dtype not in _LOGIT_DTYPES:
                raise TypeError(f"{name}: dtype {t.dtype} is not one of float32, bfloat16, float16, float64")
        if f_s.dtype != f_t.dtype:
            raise TypeError(f"student_features: dtype {f_s.dtype} differs from teacher_feature dtype {f_t.dtype}")
        tensors.update(teacher_feature=f_t, student_features=f_s)
        feats = (f_t, f_s)
    for name, t in [(n, t) for n, v in tensors.items() for t in (v.tensors if isinstance(v, _Heads) else (v,))]:
        if t.device != device:
            raise ValueError(
                f"{name}: on {t.device}, but teacher_logits is on {device}: all inputs must share a device"
            )

    temperature = options["temperature"]
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    for name in ("ce_weight", "kd_weight", "feat_weight"):
        if not math.isfinite(options[name]):
            raise ValueError(f"{name}: must be finite, got {options[name]!r}")
    if not (options["kd_eps"] >= 0 and math.isfinite(options["kd_eps"])):
        raise ValueError(f"kd_eps: must be finite and >= 0, got {options['kd_eps']!r}")
    if not 0.0 <= options["label_smoothing"] <= 1.0:
        raise ValueError(f"label_smoothing: must lie in [0, 1], got {options['label_smoothing']!r}")
    if head_weights is None:
        head_weights = (1.0,) * (K + 1)
    else:
        head_weights = tuple(float(w) for w in head_weights)
        if len(head_weights) != K + 1:
            raise ValueError(
                f"head_weights: expected K + 1 = {K + 1} weights (teacher first, then the {K} students), "
                f"got {len(head_weights)}"
            )
        if not all(math.isfinite(w) for w in head_weights):
            raise ValueError(f"head_weights: must be finite, got {head_weights}")

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and teacher_logits.dtype != torch.float64 else "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run "
                f"the kernels on the CPU under Triton's interpreter"
            )
        for name, t in [("teacher_logits", teacher_logits)] + ([("teacher_feature", feats[0])] if feats else []):
            if t.dtype == torch.float64:
                raise TypeError(f"{name}: float64 is not supported by backend='triton'; use 'torch' or 'reference'")
    # On the CPU in eager mode, targets are range-checked: here, or by the fused CPU kernel as it reads them.
    fused = backend == "torch" and use_fused(device)
    if device.type != "cuda" and not torch.compiler.is_compiling() and not fused:
        _check_target_range(target, C, options["ignore_index"])
    return students, feats, head_weights, backend, fused


def teskd_loss(
    teacher_logits,
    student_logits,
    target,
    teacher_feature=None,
    student_features=None,
    *,
    temperature=4.0,
    ce_weight=0.2,
    kd_weight=0.8,
    feat_weight=1e-7,
    head_weights=None,
    kd_eps=1e-7,
    detach_teacher=False,
    label_smoothing=0.0,
    ignore_index=-100,
    backend="auto",
    return_parts=False,
    check_target=False,
):
    """The TESKD loss of ../shared/SPEC.md: ``ce_weight * CE + kd_weight * KD + feat_weight * FEA``.

    CE is the cross-entropy of every head (teacher and students, weighted by ``head_weights``), mean over
    the batch (samples equal to ``ignore_index`` excluded, as in PyTorch). KD is the teacher-to-student
    KL divergence at ``temperature`` T: ``T^2 * sum_k batchmean(P_eps * (log P_eps - log Q_k))`` with
    ``P_eps = softmax(teacher / T) + kd_eps``; its gradient flows into the students AND the teacher logits
    (unless ``detach_teacher``). FEA is ``sum_k sum((f_k - f_t)^2 * [f_k > 0 or f_t > 0])`` with the teacher
    feature detached: a sum, not a mean.

    Args:
        teacher_logits: the teacher's logits (the deployed network's output).
        student_logits: the K students' logits, deepest first: a sequence of K tensors or one tensor.
        target: integer class indices.
        teacher_feature: the teacher's pooled feature, or None (then the feature term is skipped).
        student_features: the K students' pooled features, or None.
        temperature: T > 0 of the distillation softmaxes.
        ce_weight, kd_weight, feat_weight: alpha, beta, gamma of SPEC.
        head_weights: K + 1 weights of the cross-entropy terms, teacher first; default all 1.
        kd_eps: added to every class of the teacher's softened probabilities.
        detach_teacher: stop the KD gradient into the teacher logits (not TESKD; for ablations).
        label_smoothing: label smoothing of the CE terms, as in ``torch.nn.functional.cross_entropy``.
        ignore_index: target value excluded from the CE terms (it still takes part in KD and FEA).
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``.
        return_parts: also return the unweighted parts.
        check_target: on CUDA, check that every target lies in [0, C) or equals ignore_index (a host
            synchronisation). On the CPU the check always runs in eager mode. Unchecked out-of-range targets
            on CUDA never read out of bounds: the triton kernels treat them like ``ignore_index``.

    Shapes:
        teacher_logits ``[B, C]``; student_logits K x ``[B, C]`` or ``[K, B, C]``; target ``[B]``;
        teacher_feature ``[B, D]`` or ``[B, D, 1, 1]``; student_features K x the same or ``[K, B, D]``.
        Any B >= 1, C >= 2, K >= 1. Logits float32, bfloat16, float16 (float64 for torch and reference);
        arithmetic in float32 at least; gradients come back in the input dtypes.

    Returns:
        The total loss (scalar float32, float64 for float64 inputs); with ``return_parts``, ``(total, parts)``
        where ``parts`` holds the detached unweighted ``"ce"``, ``"kd"`` and ``"feat"`` scalars (no host
        synchronisation).
    """
    options = dict(
        temperature=temperature,
        ce_weight=float(ce_weight),
        kd_weight=float(kd_weight),
        feat_weight=float(feat_weight),
        kd_eps=float(kd_eps),
        detach_teacher=bool(detach_teacher),
        label_smoothing=float(label_smoothing),
        ignore_index=int(ignore_index),
    )
    students, feats, head_weights, backend, fused = _validate(
        teacher_logits, student_logits, target, teacher_feature, student_features, head_weights, options, backend
    )
    if check_target and teacher_logits.device.type == "cuda":
        _check_target_range(target, teacher_logits.shape[1], options["ignore_index"])
    options["temperature"] = float(temperature)
    f_t, f_s = feats if feats is not None else (None, None)

    if backend == "reference":
        total, ce, kd, feat = teskd_loss_naive(
            teacher_logits,
            list(students.tensors),
            target.long(),
            f_t,
            None if f_s is None else list(f_s.tensors),
            head_weights=head_weights,
            **options,
        )
        parts = torch.stack([ce, kd, feat]).detach()
    elif backend == "torch":
        o = options
        opts = tuple(o[name] for name in _FUNCTION_OPTIONS)
        features = () if f_s is None else f_s.tensors
        total, parts = TESKDLossFunction.apply(
            teacher_logits, target.long(), f_t, head_weights, opts, len(students), fused, *students.tensors, *features
        )
    else:
        from teskd_fast.kernels.teskd_loss import teskd_loss_triton

        f_s = None if f_s is None else f_s.stacked
        total, parts = teskd_loss_triton(teacher_logits, students.stacked, target, f_t, f_s, head_weights, **options)
    if return_parts:
        return total, {"ce": parts[0], "kd": parts[1], "feat": parts[2]}
    return total


class TESKDLoss(nn.Module):
    """The TESKD loss as a module: ``criterion(output, target)`` or ``criterion(teacher_logits, student_logits,
    target, teacher_feature=None, student_features=None)``.

    Args: the keyword options of :func:`teskd_loss`.

    Shapes: as :func:`teskd_loss`; ``output`` is a :class:`teskd_fast.TESKDOutput` (teacher logits, student
    logits, teacher feature, student features).
    """

    def __init__(self, **options):
        super().__init__()
        unknown = set(options) - set(_OPTION_NAMES)
        if unknown:
            raise TypeError(f"TESKDLoss: unknown options {sorted(unknown)}; valid: {sorted(_OPTION_NAMES)}")
        self.options = options

    def forward(self, *args, **kwargs):
        if len(args) == 2 and isinstance(args[0], TESKDOutput):
            out, target = args
            return teskd_loss(
                out.logits, out.student_logits, target, out.feature, out.student_features, **self.options, **kwargs
            )
        return teskd_loss(*args, **self.options, **kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_FUNCTION_OPTIONS = (
    "temperature",
    "ce_weight",
    "kd_weight",
    "feat_weight",
    "kd_eps",
    "detach_teacher",
    "label_smoothing",
    "ignore_index",
)
_OPTION_NAMES = (
    "temperature",
    "ce_weight",
    "kd_weight",
    "feat_weight",
    "head_weights",
    "kd_eps",
    "detach_teacher",
    "label_smoothing",
    "ignore_index",
    "backend",
    "return_parts",
    "check_target",
)
