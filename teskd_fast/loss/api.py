"""The TESKD loss's public API: ``teskd_loss`` and ``TESKDLoss``.

``teskd_loss`` validates its inputs (clear errors naming the argument, shapes and dtypes), gathers its options in
one :class:`~teskd_fast.loss.options.LossOptions` and dispatches to

- ``"reference"``: :mod:`teskd_fast.loss.reference`, the plain PyTorch composition (the oracle);
- ``"torch"``: :mod:`teskd_fast.loss.closed_form`, closed-form gradients in autograd Functions (the fused C
  kernel ``teskd_fast.kernels.teskd_loss_cpu`` on the CPU, else batched ops);
- ``"triton"``: ``teskd_fast.kernels.teskd_loss``, fused Triton kernels (CUDA; or the CPU under
  ``TRITON_INTERPRET=1``);
- ``"auto"``: triton for CUDA tensors, torch elsewhere.
"""

import inspect
import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from teskd_fast.kernels.teskd_loss_cpu import target_error
from teskd_fast.outputs import TESKDOutput

from .closed_form import closed_form_loss, use_fused
from .options import PARTS, SPEC, LossOptions, Option, convert
from .reference import teskd_loss_reference

BACKENDS = ("auto", "reference", "torch", "triton")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _shape(t):
    return tuple(t.shape)


def _heads(name, value, expect_rank, flatten=None):
    """A sequence of K tensors, or one tensor with a leading K dimension -> :class:`_Heads`; ``flatten`` (if given)
    is applied to each tensor first.

    Neither form is converted here: the torch backend takes a stacked tensor as one input and a sequence as its K
    tensors (no copy, no views); the others stack a sequence, or unbind a stacked tensor, on demand.
    """
    if isinstance(value, torch.Tensor):
        if flatten is not None:
            value = flatten(value)
        if value.dim() != expect_rank + 1:
            raise ValueError(
                f"{name}: expected a [K, B, {'C' if name == 'student_logits' else 'D'}] tensor or a sequence of K "
                f"tensors, got a tensor of shape {_shape(value)}"
            )
        if value.shape[0] == 0:
            raise ValueError(f"{name}: K = 0 students (a tensor of shape {_shape(value)}); TESKD needs at least one")
        return _Heads(value, None)
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name}: K = 0 students; TESKD needs at least one student")
    tensors = []
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
        tensors.append(t if flatten is None else flatten(t))
    shape = tensors[0].shape
    for t in tensors:
        if t.shape != shape:
            raise ValueError(f"{name}: the K tensors differ in shape: {[_shape(t) for t in tensors]}")
    return _Heads(None, tuple(tensors))


class _Heads:
    """K per-student tensors, given stacked (one ``[K, ...]`` tensor) or as K tensors; the other form is made on
    demand (once)."""

    def __init__(self, stacked, tensors):
        self._stacked, self._tensors = stacked, tensors
        self.is_stacked = stacked is not None
        given = stacked if stacked is not None else tensors[0]
        self.shape = tuple(stacked.shape) if stacked is not None else (len(tensors), *given.shape)
        # Each tensor's own dtype (a sequence may mix them, as autocast makes them).
        self.dtypes = tuple(dict.fromkeys(t.dtype for t in self.inputs))

    def __len__(self):
        return self.shape[0]

    @property
    def given(self):
        """The tensors as given: the stacked tensor, or the tuple of K tensors."""
        return self._stacked if self.is_stacked else self._tensors

    @property
    def inputs(self):
        """The tensors as given: ``(stacked,)`` or the K tensors."""
        return (self._stacked,) if self.is_stacked else self._tensors

    @property
    def stacked(self):
        if self._stacked is None:
            self._stacked = torch.stack(self._tensors, 0)
        return self._stacked

    @property
    def tensors(self):
        if self._tensors is None:
            self._tensors = self._stacked.unbind(0)
        return self._tensors


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
        raise target_error(target, int(bad.nonzero()[0, 0]), num_classes, ignore_index)


def _check_float(name, dtypes):
    for dtype in dtypes:
        if dtype not in _LOGIT_DTYPES:
            raise TypeError(f"{name}: dtype {dtype} is not one of float32, bfloat16, float16, float64")


def _check_teacher(teacher_logits):
    if not isinstance(teacher_logits, torch.Tensor):
        raise TypeError(f"teacher_logits: expected a tensor, got {type(teacher_logits).__name__}")
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits: expected [B, C], got shape {_shape(teacher_logits)}")
    B, C = teacher_logits.shape
    if B < 1:
        raise ValueError(f"teacher_logits: empty batch, shape {_shape(teacher_logits)}")
    if C < 2:
        raise ValueError(f"teacher_logits: need at least 2 classes, got C = {C} (shape {_shape(teacher_logits)})")
    _check_float("teacher_logits", [teacher_logits.dtype])


def _check_students(students, teacher_logits):
    K, (B, C) = len(students), teacher_logits.shape
    if students.shape[1:] != teacher_logits.shape:
        raise ValueError(
            f"student_logits: each student must match teacher_logits [B, C] = {[B, C]}, "
            f"got student shape {list(students.shape[1:])} (K = {K})"
        )
    # Any floating dtype, each its own (autocast may leave a head in float32): the loss computes in float32, or
    # float64 where an input is float64.
    _check_float("student_logits", students.dtypes)


def _check_target(target, batch):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a tensor of class indices, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target: expected integer class indices, got dtype {target.dtype}")
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target: expected shape [B] = [{batch}], got {_shape(target)}")


def _features(teacher_feature, student_features, K, B):
    """The ``[B, D]`` teacher feature and the K student features as :class:`_Heads`, checked; or None."""
    if (teacher_feature is None) != (student_features is None):
        raise ValueError("teacher_feature and student_features: give both or neither")
    if teacher_feature is None:
        return None
    if not isinstance(teacher_feature, torch.Tensor):
        raise TypeError(f"teacher_feature: expected a tensor, got {type(teacher_feature).__name__}")
    f_t = _flat_feature(teacher_feature)
    if f_t.dim() != 2 or f_t.shape[0] != B:
        raise ValueError(
            f"teacher_feature: expected [B, D] or [B, D, 1, 1] with B = {B}, got {_shape(teacher_feature)}"
        )
    f_s = _heads("student_features", student_features, 2, _flat_feature)
    if len(f_s) != K:
        raise ValueError(f"student_features: {len(f_s)} students, but student_logits has K = {K}")
    if f_s.shape[1:] != f_t.shape:
        raise ValueError(
            f"student_features: each student feature must match teacher_feature [B, D] = {list(f_t.shape)}, "
            f"got {list(f_s.shape[1:])}"
        )
    _check_float("teacher_feature", [f_t.dtype])
    _check_float("student_features", f_s.dtypes)
    return f_t, f_s


def _check_devices(device, named):
    for name, t in named:
        if t.device != device:
            raise ValueError(
                f"{name}: on {t.device}, but teacher_logits is on {device}: all inputs must share a device"
            )


def _head_weights(head_weights, K):
    if head_weights is None:
        return (1.0,) * (K + 1)
    if getattr(head_weights, "ndim", 1) != 1:  # a tensor or a numpy array
        raise ValueError(
            f"head_weights: expected K + 1 = {K + 1} numbers (teacher first), got a {type(head_weights).__name__} "
            f"of shape {tuple(head_weights.shape)}"
        )
    # Each weight by the options' one rule (a number of any numeric type, or a 0-d tensor).
    weight = Option("head_weights", float, 1.0, None, "")
    try:
        weights = tuple(convert(weight, w) for w in head_weights)
    except TypeError as exc:
        raise TypeError(
            f"head_weights: expected K + 1 = {K + 1} numbers (teacher first), got {head_weights!r}"
        ) from exc
    if len(weights) != K + 1:
        raise ValueError(
            f"head_weights: expected K + 1 = {K + 1} weights (teacher first, then the {K} students), got {len(weights)}"
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"head_weights: must be finite, got {weights}")
    return weights


def _backend(backend, teacher_logits, students, feats):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    device = teacher_logits.device
    named = [("teacher_logits", teacher_logits.dtype), *(("student_logits", d) for d in students.dtypes)]
    if feats is not None:
        named += [("teacher_feature", feats[0].dtype), *(("student_features", d) for d in feats[1].dtypes)]
    float64 = [name for name, dtype in named if dtype == torch.float64]
    if backend == "auto":
        return "triton" if device.type == "cuda" and not float64 else "torch"
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run "
                f"the kernels on the CPU under Triton's interpreter"
            )
        if float64:
            raise TypeError(
                f"{float64[0]}: float64 is not supported by backend='triton'; use 'torch' or 'reference'"
            )
    return backend


def _validate(teacher_logits, student_logits, target, teacher_feature, student_features, head_weights, backend):
    """Check every input; returns ``(students, feats, head_weights, backend)``."""
    _check_teacher(teacher_logits)
    B, _ = teacher_logits.shape
    students = _heads("student_logits", student_logits, 2)
    _check_students(students, teacher_logits)
    _check_target(target, B)
    feats = _features(teacher_feature, student_features, len(students), B)
    named = [("target", target), *(("student_logits", t) for t in students.inputs)]
    if feats is not None:
        named += [("teacher_feature", feats[0]), *(("student_features", t) for t in feats[1].inputs)]
    _check_devices(teacher_logits.device, named)
    backend = _backend(backend, teacher_logits, students, feats)
    return students, feats, _head_weights(head_weights, len(students)), backend


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
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The TESKD loss (docs/method.md, "Loss"): ``ce_weight * CE + kd_weight * KD + feat_weight * FEA``.

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
        ce_weight, kd_weight, feat_weight: alpha, beta, gamma of the method.
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
    options = LossOptions.checked(
        temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight, feat_weight=feat_weight, kd_eps=kd_eps,
        detach_teacher=detach_teacher, label_smoothing=label_smoothing, ignore_index=ignore_index,
    )  # fmt: skip
    students, feats, head_weights, backend = _validate(
        teacher_logits, student_logits, target, teacher_feature, student_features, head_weights, backend
    )
    f_t, f_s = feats if feats is not None else (None, None)
    device = teacher_logits.device
    # Targets are range-checked on the CPU in eager mode (by the fused kernel as it reads them, else here), and on
    # CUDA when asked (a host synchronisation).
    fused = backend == "torch" and use_fused(device)
    eager_cpu = device.type != "cuda" and not torch.compiler.is_compiling()
    if (eager_cpu and not fused) or (check_target and device.type == "cuda"):
        _check_target_range(target, teacher_logits.shape[1], options.ignore_index)

    if backend == "reference":
        total, ce, kd, feat = teskd_loss_reference(
            teacher_logits, students.tensors, target.long(), f_t, None if f_s is None else f_s.tensors, head_weights,
            options,
        )  # fmt: skip
        parts = torch.stack([ce, kd, feat]).detach()
    elif backend == "torch":
        # Stacked students (logits or features) enter as one tensor, a sequence as its K tensors.
        total, parts = closed_form_loss(
            teacher_logits, students.given, target.long(), f_t, None if f_s is None else f_s.given, head_weights,
            options, fused,
        )  # fmt: skip
    else:
        from teskd_fast.kernels.teskd_loss import teskd_loss_triton

        # The kernels take one dtype for the logits and one for the features: mixed inputs meet in the widest
        # (a cast autograd takes back to each input's dtype).
        logits, features = _promoted([teacher_logits, students]), _promoted(feats or [])
        teacher_logits, s_stacked = logits or (teacher_logits, students.stacked)
        f_t, f_s = features or (f_t, None if f_s is None else f_s.stacked)
        total, parts = teskd_loss_triton(teacher_logits, s_stacked, target, f_t, f_s, head_weights, options)
    if return_parts:
        return total, dict(zip(PARTS, parts, strict=True))
    return total


def _promoted(pair):
    """``[teacher, students]`` (a tensor and :class:`_Heads`) as two tensors of one dtype, the widest of theirs
    (the students stacked); None where they already share one."""
    if not pair:
        return None
    teacher, students = pair
    dtypes = {teacher.dtype, *students.dtypes}
    if len(dtypes) == 1:
        return None
    dtype = teacher.dtype
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    return teacher.to(dtype), torch.stack([t.to(dtype) for t in students.tensors])


class TESKDLoss(nn.Module):
    """The TESKD loss as a module: ``criterion(output, target)`` or ``criterion(teacher_logits, student_logits,
    target, teacher_feature=None, student_features=None)``.

    Args: the keyword options of :func:`teskd_loss`.

    Shapes: as :func:`teskd_loss`; ``output`` is a :class:`teskd_fast.TESKDOutput` (teacher logits, student
    logits, teacher feature, student features).
    """

    def __init__(self, **options) -> None:
        super().__init__()
        unknown = set(options) - set(_OPTION_NAMES)
        if unknown:
            raise TypeError(f"TESKDLoss: unknown options {sorted(unknown)}; valid: {sorted(_OPTION_NAMES)}")
        self.options = options

    def forward(self, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if len(args) == 2 and isinstance(args[0], TESKDOutput):
            out, target = args
            return teskd_loss(
                out.logits, out.student_logits, target, out.feature, out.student_features, **self.options, **kwargs
            )
        if len(args) + len(kwargs.keys() & {"student_logits", "target"}) < 3:
            raise TypeError(
                f"TESKDLoss: expected criterion(output, target) with output a TESKDOutput (the network's output in "
                f"training mode), or criterion(teacher_logits, student_logits, target, ...); got "
                f"({', '.join(type(a).__name__ for a in args)})"
            )
        return teskd_loss(*args, **self.options, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# The keyword options of teskd_loss, the ones TESKDLoss accepts.
_OPTION_NAMES = (*LossOptions._fields, "head_weights", "backend", "return_parts", "check_target")


def check_signature(spec=SPEC) -> None:
    """``teskd_loss`` takes every option of ``spec`` as a keyword, with its default: a RuntimeError names one it
    lacks or whose default differs (called at import)."""
    parameters = inspect.signature(teskd_loss).parameters
    for option in spec:
        parameter = parameters.get(option.name)
        if parameter is None or parameter.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise RuntimeError(f"teskd_loss: the option {option.name} (kernels/options.py) is not a keyword of it")
        if parameter.default != option.default or type(parameter.default) is not type(option.default):
            raise RuntimeError(
                f"teskd_loss: {option.name}'s default is {parameter.default!r}, the specification's {option.default!r}"
            )


check_signature()
