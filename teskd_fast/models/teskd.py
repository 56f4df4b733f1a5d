"""TESKD networks: a teacher backbone plus students on an FPN-like top-down path (docs/method.md, "Network").

The published network has three students (levels 3, 2, 1), every student module W wide. ``student_levels`` keeps
any non-empty subset of them (the top-down path stops at the finest level asked for) and ``student_width`` sets
the width of the students' path and heads; each student's last 1x1 conv maps that width back to W, the teacher
feature's, so that the loss compares like with like. The defaults are the published network exactly.

``TESKDNet`` is the ``faithful`` formulation: the reference's modules, called module by module. ``FastTESKDNet``
(``formulation="fast"``) has the very same modules and parameters (identical state_dict) and computes the same
function with fewer operations; see :mod:`teskd_fast.models.fast`.

Any input size: where a stage is not exactly half the previous one (a 200x200 ImageNet input gives s1..s4 at 50, 25,
13, 7), the bilinear resize goes to the lateral's exact size, and the input of each student head (k x k conv with
stride k) is zero-padded evenly on both sides (the extra row/column at the bottom/right; a negative amount crops) to
exactly k times s4's size, so that every student ends at s4's spatial size. On sizes where every stage halves (all
multiples of 32 for the ResNets) both are no-ops and the network is the reference's.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from teskd_fast.outputs import TESKDOutput

from .resnet import stage_channels
from .timm_backbone import classify, is_timm_classifier, prepare_classifier, timm_levels

RESNET_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
# The students of the published network, deepest first: level i sits on stage i (its head has kernel s4 / s_i).
STUDENT_LEVELS = (3, 2, 1)


def check_num_classes(num_classes) -> None:
    """Raise a ValueError unless ``num_classes`` is an int >= 2 (the TESKD loss needs two classes at least)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (the TESKD loss's cross-entropy and distillation need "
                         f"two classes at least), got {num_classes!r}")


def check_student_levels(levels) -> tuple[int, ...]:
    """``levels`` as a tuple, deepest first; a ValueError unless it is a non-empty set of levels among 3, 2, 1."""
    try:
        given = tuple(levels)
    except TypeError:
        given = None
    if (not given or any(isinstance(v, bool) or not isinstance(v, int) for v in given)
            or not set(given) <= set(STUDENT_LEVELS) or len(set(given)) != len(given)):
        raise ValueError(f"student_levels must be a non-empty subset of {STUDENT_LEVELS} without repeats (level 3: "
                         f"the deepest student, on stage 3; level 1: the finest, on stage 1), got {levels!r}")
    return tuple(sorted(given, reverse=True))


def check_student_width(width) -> int | None:
    """``width`` (None: W); a ValueError unless it is None or a positive int."""
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"student_width must be a positive int (None: W, the published network), got {width!r}")
    return width


class ResizeTo(nn.Module):
    """Bilinear resize (align_corners=True) to an explicit size.

    The reference's ``nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)`` wherever the target is
    exactly twice the input (align_corners=True samples the same points either way); any size otherwise.
    """

    def forward(self, x, size) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def check_image_batch(x, channels, dtype) -> None:
    """Raise unless ``x`` is an image batch a network with ``channels`` input channels and ``dtype`` weights takes.

    Reads only the shape and dtype (no host synchronisation; under ``torch.compile`` the check is resolved while
    tracing and costs nothing at run time).

    Args:
        x: the input batch.
        channels: the first convolution's input channels (None: any).
        dtype: the network's parameter dtype. ``x`` must have this dtype; under autocast (on ``x``'s device type)
            float32, bfloat16 and float16 mix freely (autocast casts them; it never casts float64).

    Raises:
        TypeError: ``x`` is not a tensor, or has an integer / other dtype than the network's.
        ValueError: ``x`` is not ``[B, channels, H, W]``.
    """
    c = "C" if channels is None else channels
    want = f"a {_dtype_name(dtype)} [B, {c}, H, W] image batch"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected {want}, got {type(x).__name__}")
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        raise ValueError(f"expected {want}, got {_dtype_name(x.dtype)} of shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"expected {want}, got {_dtype_name(x.dtype)} of shape {list(x.shape)}: convert the images "
                        f"to {_dtype_name(dtype)} (and normalise them) first")
    # Autocast casts float32 / bfloat16 / float16 operands to its dtype, never float64 ones.
    # (A meta tensor, shapes only, as teskd_fast.cost may count with, has no autocast.)
    cast = (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
            and torch.float64 not in (x.dtype, dtype))
    if x.dtype != dtype and not cast:
        raise TypeError(f"expected {want}, got {_dtype_name(x.dtype)} of shape {list(x.shape)}: the input's dtype "
                        "must be the network's (or, for float32 / bfloat16 / float16, run under torch.autocast)")


def check_resnet_input(net, args) -> None:
    """Forward pre-hook for a plain torchvision ResNet: :func:`check_image_batch` against its ``conv1``.

    ``build_model`` puts it on the baseline's network (an exported teacher); :func:`teskd_fast.export_teacher`
    returns the ResNet without it, so that the deployed model stays plain torchvision (TorchScript takes it).
    """
    if args:
        check_image_batch(args[0], net.conv1.in_channels, net.conv1.weight.dtype)


def check_plain_input(net, args) -> None:
    """Forward pre-hook for a plain teacher: :func:`check_resnet_input` for a ResNet, else :func:`check_image_batch`
    against the model's parameter dtype (any channel count: a timm model's stem says it in its own terms)."""
    if hasattr(net, "conv1") and isinstance(net.conv1, nn.Conv2d):
        check_resnet_input(net, args)
    elif args:
        check_image_batch(args[0], None, next(net.parameters()).dtype)


def conv_bn_relu(cin, cout, kernel=1, stride=1, bias=False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def fit(x, size) -> torch.Tensor:
    """Zero-pad (or crop) the last two dims of ``x`` evenly to ``size``; the extra row/column goes bottom/right."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


class TESKDNet(nn.Module):
    """A teacher backbone with TESKD students, in the reference's formulation (``formulation="faithful"``).

    Build it with :func:`teskd_fast.create_model` or :func:`teskd_fast.wrap`. The teacher is the backbone with its
    head (global average pool, ``fc``); the students (``laterals``, ``upsample``, ``fuse_*``, ``downsample*``,
    ``fc_b*``) exist for training only, and :meth:`teacher_forward` skips them. Parameter names are the reference
    implementation's; :meth:`load_official_state_dict` loads its checkpoints.

    Args:
        backbone: a torchvision ``ResNet`` (its modules become this module's ``conv1 ... layer4``, as in the
            reference), a timm classifier with ``forward_intermediates`` (kept whole as ``backbone``: the stages are
            its last four feature levels, the teacher head is its own; see :mod:`teskd_fast.models.timm_backbone`),
            or a module returning a list of feature maps (a timm ``features_only`` model), of which the last four
            are the stages s1..s4.
        num_classes: classes of the teacher and of every student.
        channels: c1..c4 (read from a ResNet or a timm classifier when None).
        strides: the stages' strides relative to the input (e.g. (4, 8, 16, 32)); the student head at level i has
            kernel and stride s4 / s_i. Read from a ResNet or a timm classifier when None.
        fc: the teacher's linear (``W -> num_classes``); a new one when None (none for a timm classifier).
        width: W, the teacher feature's width (None: c4; a timm classifier's pre-logits width).
        student_width: the width of the students' top-down path and heads (laterals, up blocks, fuse blocks, the
            k x k head conv); each head's last 1x1 conv maps it to W. None: W, the published network.
        student_levels: which students exist, any non-empty subset of (3, 2, 1) (3: the deepest, on stage 3);
            the top-down path stops at the finest level asked for. Modules of absent levels do not exist (their
            ``laterals`` / ``upsample`` slots hold None); the others keep the published names.

    Shapes:
        x: ``[B, 3, H, W]``; teacher logits ``[B, C]``, student logits K = len(student_levels) ``[B, C]`` (deepest
        first), features ``[B, W]`` (W: c4, or a timm head's pre-logits width).
    """

    formulation = "faithful"

    def __init__(self, backbone, num_classes, channels=None, strides=None, fc=None, width=None, student_width=None,
                 student_levels=STUDENT_LEVELS) -> None:
        super().__init__()
        check_num_classes(num_classes)
        student_width = check_student_width(student_width)
        levels = check_student_levels(student_levels)
        from torchvision.models import ResNet

        if isinstance(backbone, ResNet):
            self.kind = "resnet"
            for name in RESNET_MODULES:
                setattr(self, name, getattr(backbone, name))
            channels = list(channels or stage_channels(backbone))
            strides = list(strides or (1, 2, 4, 8))
        elif is_timm_classifier(backbone):
            # The user's timm model itself: its own head is the teacher's (no fc of ours).
            self.kind = "timm"
            self.backbone = prepare_classifier(backbone, num_classes)
            channels, strides, width = timm_levels(backbone)
            self.head_dropout = float(getattr(backbone, "drop_rate", 0.0) or 0.0) > 0
        else:
            if channels is None or strides is None:
                raise ValueError("a non-ResNet backbone needs its four stages' channels and strides")
            self.kind = "features"
            self.backbone = backbone
        channels, strides = [int(c) for c in channels], [int(s) for s in strides]
        if len(channels) != 4 or len(strides) != 4:
            raise ValueError(f"TESKD needs 4 stages, got channels {channels} and strides {strides}")
        kernels = [strides[3] // s for s in strides[:3]]
        if any(strides[3] % s for s in strides[:3]) or any(strides[i + 1] <= strides[i] for i in range(3)):
            raise ValueError(f"stage strides must increase and divide the last one, got {strides}")
        self.channels, self.strides, self.num_classes = channels, strides, num_classes
        width = int(width or channels[3])
        self.width = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        if self.kind != "timm":
            self.fc = fc if fc is not None else nn.Linear(width, num_classes)
            if self.fc.in_features != width or self.fc.out_features != num_classes:
                raise ValueError(f"teacher fc must map {width} -> {num_classes}, got {self.fc}")
        self.student_width = sw = student_width or width
        self.student_levels = levels
        # The students, created after the backbone: PyTorch's default initialisation, as in the reference, in its
        # order. The top-down path reaches the finest level asked for; slots of the levels below hold None.
        finest = min(levels)
        self.laterals = nn.ModuleList(nn.Sequential(*conv_bn_relu(c, sw)) if i + 1 >= finest else None
                                      for i, c in enumerate(channels))
        self.upsample = nn.ModuleList(nn.Sequential(ResizeTo(), *conv_bn_relu(sw, sw)) if j + 1 >= finest else None
                                      for j in range(3))
        for level in (1, 2, 3):
            if level >= finest:
                setattr(self, f"fuse_{level}", nn.Sequential(*conv_bn_relu(2 * sw, sw)))
        for level, k in zip((1, 2, 3), kernels, strict=True):
            if level in levels:
                # The last 1x1 conv maps the students' width back to W, the teacher feature's.
                head = conv_bn_relu(sw, sw, k, stride=k, bias=True) + conv_bn_relu(sw, width, bias=True)
                setattr(self, f"downsample{level}", nn.Sequential(*head))
        for level in STUDENT_LEVELS:
            if level in levels:
                setattr(self, f"fc_b{level}", nn.Linear(width, num_classes))

    def check_input(self, x) -> None:
        """Raise a ValueError / TypeError unless ``x`` is an image batch this network takes (see
        :func:`check_image_batch`): ``[B, 3, H, W]`` in the parameters' dtype, or any floating dtype under autocast."""
        if self.kind == "resnet":
            check_image_batch(x, self.conv1.in_channels, self.conv1.weight.dtype)
        else:
            check_image_batch(x, None, next(self.backbone.parameters()).dtype)

    # The input's memory format on the way in (the fast formulation: channels-last).
    input_format = None

    def _input(self, x) -> torch.Tensor:
        self.check_input(x)
        return x if self.input_format is None else x.contiguous(memory_format=self.input_format)

    def stages(self, x) -> list[torch.Tensor]:
        """The backbone's stage outputs s1..s4 for the image batch ``x`` ``[B, 3, H, W]``."""
        return self._backbone(self._input(x))[0]

    def _backbone(self, x) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """``(s1..s4, final)``: the stages, and for a timm model its final features (its head's input)."""
        if self.kind == "timm":
            final, stages = self.backbone.forward_intermediates(x, indices=4)
            return list(stages), final
        if self.kind == "features":
            return list(self.backbone(x))[-4:], None
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        s1 = self.layer1(x)
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        return [s1, s2, s3, self.layer4(s3)], None

    def teacher_forward(self, x) -> torch.Tensor:
        """Teacher logits ``[B, C]`` for ``x`` ``[B, 3, H, W]``: the backbone and its head, no student work at all."""
        x = self._input(x)
        if self.kind == "timm":
            return self.backbone(x)
        s4 = self._backbone(x)[0][-1]
        return self.fc(torch.flatten(self.avgpool(s4), 1))

    def forward(self, x) -> TESKDOutput:
        """Teacher and students on ``x`` ``[B, 3, H, W]``.

        Returns:
            :class:`teskd_fast.TESKDOutput`: teacher logits ``[B, C]``, student logits for levels 3, 2, 1
            (deepest first), teacher feature ``[B, W]`` and student features in the same order.
        """
        stages, final = self._backbone(self._input(x))
        if self.kind == "timm":
            # The model's own head: its pre-logits are the teacher feature, its classifier gives the logits (the
            # head run once more only where timm's head dropout, drop_rate > 0, sits between the two).
            feature = self.backbone.forward_head(final, pre_logits=True)
            classifier = self.backbone.get_classifier()
            logits = self.backbone.forward_head(final) if self.head_dropout else classify(classifier, feature)
        else:
            feature = torch.flatten(self.avgpool(stages[3]), 1)
            logits = self.fc(feature)
        student_logits, student_features = self.students(stages)
        return TESKDOutput(logits, student_logits, feature, student_features)

    def students(self, stages, levels=None) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Student logits and features from the stage outputs, deepest first, module by module as the reference.

        ``levels``: the students to compute (default: all of ``student_levels``; any of them, deepest first): the
        top-down path stops at the finest. :func:`teskd_fast.cost` counts each student's work this way.
        """
        levels = self.student_levels if levels is None else levels
        size4 = stages[3].shape[-2:]
        t = self.laterals[3](stages[3])
        path = {}
        for level in range(3, min(levels) - 1, -1):
            lateral = self.laterals[level - 1](stages[level - 1])
            up = self.upsample[level - 1]
            u = up[3](up[2](up[1](up[0](t, lateral.shape[-2:]))))
            t = getattr(self, f"fuse_{level}")(torch.cat((u + lateral, u), dim=1))
            path[level] = t
        logits, features = [], []
        for level in levels:
            head = getattr(self, f"downsample{level}")
            k = head[0].kernel_size
            h = head(fit(path[level], (k[0] * size4[0], k[1] * size4[1])))
            f = torch.flatten(self.avgpool(h), 1)
            features.append(f)
            logits.append(getattr(self, f"fc_b{level}")(f))
        return tuple(logits), tuple(features)

    def heads(self) -> tuple[nn.Sequential, ...]:
        """The student heads, deepest first (``downsample3``, ``downsample2``, ``downsample1`` of those present)."""
        return tuple(getattr(self, f"downsample{level}") for level in self.student_levels)

    def extra_repr(self) -> str:
        return (f"formulation={self.formulation!r}, kind={self.kind!r}, channels={self.channels}, width={self.width}, "
                f"student_width={self.student_width}, student_levels={self.student_levels}")

    def load_official_state_dict(self, state_dict) -> "TESKDNet":
        """Load a checkpoint of the published reference implementation, strictly.

        Args:
            state_dict: the reference model's ``state_dict()`` (reference parameter names; a ``"module."`` prefix
                from DataParallel/DDP is removed; a dict with a ``"state_dict"`` or ``"model"`` entry is unpacked).

        Raises:
            TypeError: ``state_dict`` is not a dict, or one of its values is not a tensor (the key is named).
            ValueError: the key set differs (the first missing and unexpected keys and their counts are named), or
                a tensor's shape differs (the key and both shapes are named).
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"expected a state_dict (a dict of tensors), got {type(state_dict).__name__}")
        for key in ("state_dict", "model"):
            if key in state_dict and isinstance(state_dict[key], dict):
                state_dict = state_dict[key]
        state_dict = {k[len("module.") :] if isinstance(k, str) and k.startswith("module.") else k: v
                      for k, v in state_dict.items()}
        check_state_dict(state_dict, self.state_dict(), f"the TESKD {self.kind} network")
        self.load_state_dict(state_dict, strict=True)
        return self


def _some(keys, shown=5):
    """``'a', 'b', ... (12 in all)``: the first few of ``keys`` and their count."""
    keys = sorted(keys, key=str)
    head = ", ".join(repr(k) for k in keys[:shown])
    return head + (f", ... ({len(keys)} in all)" if len(keys) > shown else "")


def check_state_dict(state_dict, expected, target="the network") -> None:
    """Raise unless ``state_dict`` loads strictly where ``expected`` (a module's ``state_dict()``) came from.

    Args:
        state_dict: the dict to check.
        expected: the destination's ``state_dict()`` (its keys and shapes).
        target: what the destination is, for the messages.

    Raises:
        TypeError: ``state_dict`` is not a dict, or a value is not a tensor (the first such keys are named).
        ValueError: the key sets differ (the first few missing and unexpected keys and their counts), or shapes
            differ (the first few keys, each with the given and the expected shape).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"expected a state_dict (a dict of tensors) for {target}, got {type(state_dict).__name__}")
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    if missing or unexpected:
        parts = [f"{len(missing)} missing key(s) [{_some(missing)}]" if missing else "",
                 f"{len(unexpected)} unexpected key(s) [{_some(unexpected)}]" if unexpected else ""]
        raise ValueError(f"state_dict does not match {target}: {'; '.join(p for p in parts if p)}")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        first = not_tensors[0]
        raise TypeError(f"state_dict entry {first!r} is a {type(state_dict[first]).__name__}, not a tensor"
                        + (f" (and {len(not_tensors) - 1} more: {_some(not_tensors[1:])})" if len(not_tensors) > 1
                           else ""))
    wrong = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        shapes = "; ".join(f"{k}: {tuple(state_dict[k].shape)} given, {tuple(expected[k].shape)} expected"
                           for k in wrong[:5])
        raise ValueError(f"state_dict shapes do not fit {target} in {len(wrong)} entry(ies): {shapes}"
                         + (" ..." if len(wrong) > 5 else ""))
