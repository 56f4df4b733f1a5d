"""What TESKD's students cost: multiply-accumulates and parameters of the teacher and of each student.

Counted by ``torch.utils.flop_counter`` on one image: a forward in eval mode without gradient, every convolution and
matrix product (one multiply-accumulate is two of its FLOPs; BatchNorm, activations, pooling and resizes are not
counted). The backbone is the teacher, the network that is deployed: its backbone and head
(``teacher_forward``). Each student owns its head and linear and the top-down path's modules from the previous
(deeper) student's level down to its own (the deepest student also the stage-4 lateral), so that the students'
sum is the whole extra work of TESKD. The numbers follow the network's formulation: the ``fast`` one does less
(its up blocks convolve at the coarse resolution).

:data:`COST_LIMIT` is the multiple of the backbone above which :func:`cost_warning` speaks. The published recipe,
ResNet-18 with the CIFAR stem at 32 px, has students of 2.2x its backbone in the fast formulation (2.7x faithful;
2.1x and 2.5x at 224 px with the ImageNet stem): the cost at which the method's published gains were measured.
The limit leaves that recipe and its like a margin, and catches the networks where the students' arithmetic,
not the backbone's, is the training step (timm's light models, whose pre-logits are wider than their stages:
EfficientNet-B0 and MobileNetV3 at tens to hundreds of times their backbone).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .teskd import TESKDNet

# Students costing more than this many times the backbone's multiply-accumulates get a warning (see above).
COST_LIMIT = 4.0
# Student widths suggested by cost_warning are multiples of this (tensor-core and SIMD friendly).
WIDTH_STEP = 8


@dataclass(frozen=True)
class StudentCost:
    """One student: its level (3: the deepest), forward multiply-accumulates per image, parameters."""

    level: int
    macs: int
    params: int


@dataclass(frozen=True)
class ModelCost:
    """The teacher's and the students' cost, from :func:`cost`.

    Attributes:
        image_size: ``(H, W)`` of the counted image.
        formulation: ``"fast"`` or ``"faithful"``.
        width: W, the teacher feature's width.
        student_width: the students' width.
        student_levels: the students, deepest first.
        backbone_macs: the teacher's forward multiply-accumulates per image (backbone and head).
        backbone_params: the teacher's parameters.
        students: one :class:`StudentCost` per student, deepest first.
    """

    image_size: tuple[int, int]
    formulation: str
    width: int
    student_width: int
    student_levels: tuple[int, ...]
    backbone_macs: int
    backbone_params: int
    students: tuple[StudentCost, ...]

    @property
    def student_macs(self) -> int:
        """All students' forward multiply-accumulates per image."""
        return sum(s.macs for s in self.students)

    @property
    def student_params(self) -> int:
        return sum(s.params for s in self.students)

    @property
    def ratio(self) -> float:
        """The students' multiply-accumulates over the backbone's."""
        return self.student_macs / max(self.backbone_macs, 1)

    def line(self) -> str:
        """``students: 1.23 GMAC per image = 2.2x the backbone's 0.555 at 32x32 px; width 512, levels 3,2,1``."""
        unit, scale = _unit(max(self.student_macs, self.backbone_macs))
        levels = ",".join(str(level) for level in self.student_levels)
        return (f"students: {self.student_macs / scale:.3g} {unit}MAC per image = {format_ratio(self.ratio)} the "
                f"backbone's {self.backbone_macs / scale:.3g} at {self.image_size[0]}x{self.image_size[1]} px; "
                f"width {self.student_width}, levels {levels}")

    def to_dict(self) -> dict:
        """Plain values (for JSON), the totals and :meth:`line` included."""
        return {**asdict(self), "student_macs": self.student_macs, "student_params": self.student_params,
                "ratio": self.ratio, "line": self.line()}


def format_ratio(ratio: float) -> str:
    """``0.048x``, ``2.2x``, ``58x``."""
    return f"{ratio:.2g}x" if ratio < 1 else f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def _unit(macs: float) -> tuple[str, float]:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= 0.1 * scale:
            return unit, scale
    return "", 1.0


def teskd_network(model) -> TESKDNet:
    """The TESKD network inside ``model`` (a :func:`teskd_fast.compile_model` or DDP wrapper is looked through)."""
    net = model
    while not isinstance(net, TESKDNet):
        inner = getattr(net, "_orig_mod", None) or getattr(net, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"expected a TESKD network (teskd_fast.create_model or wrap), got {type(model).__name__}")
        net = inner
    return net


def image_size_pair(image_size) -> tuple[int, int]:
    """``(H, W)`` from an int or a pair of ints; a ValueError otherwise."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return size


def count_macs(fn, *args) -> int:
    """Multiply-accumulates of ``fn(*args)`` (``torch.utils.flop_counter``: convolutions and matrix products)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def _image(module, size) -> torch.Tensor:
    """A zero image batch of one for ``module``: its first convolution's input channels, its parameters' dtype."""
    first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    p = next(module.parameters())
    return torch.zeros(1, first.in_channels if first is not None else 3, *size, dtype=p.dtype, device=p.device)


def teacher_macs(model, image_size) -> int:
    """Forward multiply-accumulates per image of a plain network (a baseline's teacher), eval mode."""
    size = image_size_pair(image_size)
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            return count_macs(model, _image(model, size))
    finally:
        model.train(was)


def _owned(net, levels) -> dict[int, list[nn.Module]]:
    """Each student's modules: its head and linear, and the path from the previous student's level to its own."""
    owned, deeper = {}, 4
    for level in levels:
        modules = [net.laterals[3]] if deeper == 4 else []
        for lv in range(deeper - 1, level - 1, -1):
            modules += [net.laterals[lv - 1], net.upsample[lv - 1], getattr(net, f"fuse_{lv}")]
        owned[level] = modules + [getattr(net, f"downsample{level}"), getattr(net, f"fc_b{level}")]
        deeper = level
    return owned


def _student_macs(net, stages, levels) -> list[int]:
    """Each student's multiply-accumulates: the work of the first k students less that of the first k - 1."""
    totals = [0] + [count_macs(net.students, stages, levels[: k + 1]) for k in range(len(levels))]
    return [b - a for a, b in itertools.pairwise(totals)]


def _measured(net, size) -> tuple[int, list[torch.Tensor]]:
    """The backbone's multiply-accumulates for one ``size`` image, and the stage outputs (eval mode, no gradient;
    the network's mode is restored)."""
    was = net.training
    try:
        net.eval()
        with torch.no_grad():
            x = _image(net, size)
            return count_macs(net.teacher_forward, x), net.stages(x)
    finally:
        net.train(was)


def cost(model, image_size) -> ModelCost:
    """The multiply-accumulates and parameters of a TESKD network's backbone and of each of its students.

    Args:
        model: a TESKD network (:func:`teskd_fast.create_model`, :func:`teskd_fast.wrap`; compiled or DDP-wrapped
            too), either formulation. It runs one image in eval mode; its training mode is restored.
        image_size: the input side (int) or ``(H, W)``.

    Returns:
        :class:`ModelCost`; ``.line()`` is the one-line summary ``teskd-train`` prints, ``.ratio`` the students'
        multiply-accumulates over the backbone's.
    """
    net = teskd_network(model)
    size = image_size_pair(image_size)
    levels = net.student_levels
    backbone_macs, stages = _measured(net, size)
    was = net.training
    try:
        net.eval()
        with torch.no_grad():
            macs = _student_macs(net, stages, levels)
    finally:
        net.train(was)
    owned = _owned(net, levels)
    params = [sum(p.numel() for m in owned[level] for p in m.parameters()) for level in levels]
    total = sum(p.numel() for p in net.parameters())
    students = tuple(StudentCost(lv, m, p) for lv, m, p in zip(levels, macs, params, strict=True))
    return ModelCost(size, net.formulation, net.width, net.student_width, levels, backbone_macs,
                     total - sum(params), students)


def _probe_macs(net, stage_shapes, dtype, student_width, levels) -> int:
    """The students' multiply-accumulates at another width or level set, counted on the meta device (no memory,
    no arithmetic): a students-only network of ``net``'s class on stage tensors of the measured shapes."""
    with torch.device("meta"):
        probe = type(net)(nn.Identity(), net.num_classes, channels=net.channels, strides=net.strides,
                          width=net.width, student_width=student_width, student_levels=levels).eval()
        stages = [torch.empty(shape, dtype=dtype) for shape in stage_shapes]
    with torch.no_grad():
        return count_macs(probe.students, stages)


def width_within(model, image_size, limit=COST_LIMIT, levels=None) -> tuple[int, float] | None:
    """The widest student width (a multiple of 8, narrower than the model's) at which the students cost at most
    ``limit`` times the backbone, with the ratio there; None when even 8 channels cost more.

    Args:
        model: a TESKD network.
        image_size: the input side or ``(H, W)``.
        limit: the multiple of the backbone's multiply-accumulates.
        levels: the student levels to assume (default: the model's).
    """
    net = teskd_network(model)
    levels = net.student_levels if levels is None else levels
    backbone, stages = _measured(net, image_size_pair(image_size))
    shapes, dtype = [s.shape for s in stages], stages[0].dtype

    def ratio(width):
        return _probe_macs(net, shapes, dtype, width, levels) / max(backbone, 1)

    low, high = WIDTH_STEP, (net.student_width - 1) // WIDTH_STEP * WIDTH_STEP
    if high < low or ratio(low) > limit:
        return None
    # The cost grows with the width: the widest multiple of WIDTH_STEP within the limit, by bisection.
    while low < high:
        mid = (low + high + WIDTH_STEP) // (2 * WIDTH_STEP) * WIDTH_STEP
        if ratio(mid) <= limit:
            low = mid
        else:
            high = mid - WIDTH_STEP
    return low, ratio(low)


class StudentCostWarning(UserWarning):
    """The students cost more than :data:`COST_LIMIT` times the backbone (:func:`teskd_fast.wrap` says so)."""


def students_ratio(model, image_size) -> float:
    """The students' multiply-accumulates over the backbone's (one forward of the students, not one per student as
    :func:`cost` runs)."""
    net = teskd_network(model)
    backbone, stages = _measured(net, image_size_pair(image_size))
    was = net.training
    try:
        net.eval()
        with torch.no_grad():
            return count_macs(net.students, stages) / max(backbone, 1)
    finally:
        net.train(was)


def cost_warning(model, image_size, limit=COST_LIMIT, measured: ModelCost | None = None) -> str | None:
    """A one-line warning when the students cost more than ``limit`` times the backbone, else None.

    It names the measured ratio and the student width (and, where no width suffices, the fewer levels) that
    would bring it under ``limit``. ``measured``: the model's :func:`cost` at ``image_size``, if already counted.
    """
    net = teskd_network(model)
    size = image_size_pair(image_size)
    ratio = measured.ratio if measured is not None else students_ratio(net, size)
    if ratio <= limit:
        return None
    now = ",".join(map(str, net.student_levels))
    said = (f"the students cost {format_ratio(ratio)} the backbone's multiply-accumulates at {size[0]}x{size[1]} px "
            f"(more than {limit:g}x; width {net.student_width}, levels {now})")
    levels = net.student_levels
    while levels:
        found = width_within(net, size, limit, levels)
        if found is not None:
            width, within = found
            fewer = levels != net.student_levels
            listed = ",".join(map(str, levels))
            flags = f"--student-width {width}" + (f" --student-levels {listed}" if fewer else "")
            return (f"{said}: student_width {width}" + (f" with student_levels {listed}" if fewer else "")
                    + f" ({flags}) brings them to {format_ratio(within)}")
        levels = levels[:-1]
    return f"{said}: no student width brings them under {limit:g}x"


def cost_report(model, image_size, limit=COST_LIMIT) -> dict:
    """What ``teskd-train`` prints before training and writes to ``RUN_DIR/cost.json``.

    Args:
        model: a TESKD network, or a plain network (a baseline's teacher: no students).
        image_size: the input side or ``(H, W)``.
        limit: the multiple of the backbone above which ``warning`` is set (:func:`cost_warning`).

    Returns:
        ``{"line": str, "warning": str | None, ...}``: for a TESKD network, :meth:`ModelCost.to_dict` too; for a
        plain network ``backbone_macs`` and ``backbone_params``.
    """
    try:
        net = teskd_network(model)
    except TypeError:
        size = image_size_pair(image_size)
        macs = teacher_macs(model, size)
        unit, scale = _unit(macs)
        line = f"teacher: {macs / scale:.3g} {unit}MAC per image at {size[0]}x{size[1]} px; no students"
        return {"line": line, "warning": None, "image_size": size, "backbone_macs": macs,
                "backbone_params": sum(p.numel() for p in model.parameters())}
    measured = cost(net, image_size)
    return {**measured.to_dict(), "warning": cost_warning(net, image_size, limit, measured)}
