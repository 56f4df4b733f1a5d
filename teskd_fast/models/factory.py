"""Building TESKD networks: :func:`create_model` for the ResNet zoo, :func:`wrap` for any backbone."""

import warnings

import torch
import torch.nn as nn

from .cost import StudentCostWarning, cost_warning
from .cpu_conv import avoid_strided_pointwise_bug
from .fast import FastTESKDNet
from .resnet import build_resnet, check_arch
from .teskd import STUDENT_LEVELS, TESKDNet, check_num_classes
from .timm_backbone import is_timm_classifier, model_name, refuse_torchvision

FORMULATIONS = {"faithful": TESKDNet, "fast": FastTESKDNet}


def _network(formulation, backbone, num_classes, **kwargs) -> TESKDNet:
    if formulation not in FORMULATIONS:
        raise ValueError(f"unknown formulation {formulation!r}; choose 'fast' or 'faithful'")
    model = FORMULATIONS[formulation](backbone, num_classes, **kwargs)
    # Strided 1x1 convs with few input channels crash oneDNN's backward on the CPU: see cpu_conv.
    avoid_strided_pointwise_bug(model)
    if formulation == "fast":
        model = model.to(memory_format=torch.channels_last)
    return model


def create_model(arch, num_classes, stem="cifar", formulation="fast", width=1.0, student_width=None,
                 student_levels=STUDENT_LEVELS) -> TESKDNet:
    """A ResNet-family teacher with TESKD students (three by default, as published).

    Args:
        arch: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnext50_32x4d`` or ``wide_resnet50_2``.
        num_classes: classes of the teacher and of each student.
        stem: ``"cifar"`` (3x3 stride-1 conv, no max-pool; 32x32 inputs give stages at 32, 16, 8, 4) or
            ``"imagenet"`` (torchvision's 7x7 stride-2 conv and max-pool; 224 gives 56, 28, 14, 7).
        formulation: ``"fast"`` (default; same parameters and function, fewer operations, channels-last) or
            ``"faithful"`` (the reference's modules, called one by one).
        width: factor on every channel count (1.0: the published networks; smaller for demos and tests).
        student_width: channels of the students' top-down path and heads (None: W, the last stage's channels,
            the published network; smaller makes the students cheaper: :func:`teskd_fast.cost`). Each student's
            last 1x1 conv maps it back to W, so the features the loss compares stay W wide.
        student_levels: which students exist: any non-empty subset of ``(3, 2, 1)`` (3: the deepest, on stage 3;
            1: the finest, on stage 1, the most expensive); the top-down path stops at the finest level asked for.

    Returns:
        :class:`~teskd_fast.models.teskd.TESKDNet` (faithful) or :class:`~teskd_fast.models.fast.FastTESKDNet`;
        both have the reference implementation's state_dict names and shapes, and the reference's initialisation
        (ImageNet stem: kaiming-normal backbone convs; CIFAR stem: PyTorch defaults; students: PyTorch defaults);
        with another student width or fewer levels, the same names for the modules that exist.
        ``model(x)`` gives a :class:`teskd_fast.TESKDOutput`; ``model.teacher_forward(x)`` the teacher's logits.

    Shapes:
        x: ``[B, 3, H, W]``, any H, W the backbone accepts; logits ``[B, num_classes]``.
    """
    check_arch(arch, stem, width)
    check_num_classes(num_classes)
    model = _network(formulation, build_resnet(arch, num_classes, stem, width), num_classes,
                     student_width=student_width, student_levels=student_levels)
    model.arch, model.stem, model.width_factor = arch, stem, float(width)
    return model


def wrap(backbone, num_classes, formulation="fast", student_width=None, student_levels=STUDENT_LEVELS,
         check_cost=True) -> TESKDNet:
    """Build the TESKD students on an existing backbone, which becomes the teacher.

    Args:
        backbone: a torchvision ResNet-family model (``resnet*``, ``resnext*``, ``wide_resnet*``, any stem; its
            modules are taken over, not copied, and its ``fc`` is kept when it already has ``num_classes``
            outputs); a timm classifier, ``timm.create_model(NAME, num_classes=N)``, with ``forward_intermediates``
            (ConvNeXt, EfficientNet, MobileNetV3, RegNet, ResNet / ResNet-D, Swin, DLA, DPN, ...: kept whole, its
            own head is the teacher's, its classifier reset when it has another class count; the students sit on
            its last four feature levels and W is its pre-logits width); or a timm model created with
            ``features_only=True`` (its ``feature_info`` gives the channels and strides of the last four feature
            maps, the stages s1..s4; the teacher head is then a new pooling + linear).
        num_classes: classes of the teacher and of each student (2 at least).
        formulation: ``"fast"`` or ``"faithful"``.
        student_width: channels of the students' path and heads (None: W); each student's last 1x1 conv maps
            it back to W. See :func:`create_model`.
        student_levels: which students exist, any non-empty subset of ``(3, 2, 1)``. See :func:`create_model`.
        check_cost: count the students' multiply-accumulates against the backbone's at the model's input size
            (timm's: its ``patch_embed`` size or ``pretrained_cfg``; else 224 px) and warn
            (:class:`~teskd_fast.models.cost.StudentCostWarning`, once per model and size) when they exceed
            :data:`~teskd_fast.models.cost.COST_LIMIT` times the backbone, naming the width that would bring them
            under. One forward of one image; skipped where the model cannot run at that size, or where the
            backbone's device or dtype is not the new students' (the default's: move the whole afterwards).

    Returns:
        A TESKD network as :func:`create_model` gives; W is the last stage's channels, or a timm classifier's
        pre-logits width. :func:`teskd_fast.export_teacher` gives back the plain model.

    Raises:
        ValueError: ``num_classes`` below 2; a timm model with fewer than four feature levels or without a stride
            pyramid (plain ViTs), or whose classifier is not a linear map of its pre-logits; a torchvision
            classifier that is not a ResNet (the message names the timm model to use instead).
        TypeError: anything else that is not one of the above.
    """
    from torchvision.models import ResNet

    # Before anything changes the user's model (a timm classifier is reset to num_classes).
    check_num_classes(num_classes)
    options = dict(student_width=student_width, student_levels=student_levels)
    if isinstance(backbone, ResNet):
        fc = backbone.fc
        if not isinstance(fc, nn.Linear) or fc.out_features != num_classes:
            fc = None
        model = _network(formulation, backbone, num_classes, fc=fc, **options)
    elif is_timm_classifier(backbone):
        model = _network(formulation, backbone, num_classes, **options)
    else:
        refuse_torchvision(backbone)
        info = getattr(backbone, "feature_info", None)
        if info is None or not hasattr(info, "channels") or not hasattr(info, "reduction"):
            raise TypeError(
                f"wrap() takes a torchvision ResNet-family model, a timm classifier with forward_intermediates "
                f"(timm.create_model(NAME, num_classes=N)) or a timm model created with features_only=True "
                f"(which has feature_info); got {type(backbone).__name__}"
            )
        channels, strides = list(info.channels()), list(info.reduction())
        if len(channels) < 4:
            raise ValueError(f"the backbone gives {len(channels)} feature maps; TESKD needs 4 (channels {channels})")
        model = _network(formulation, backbone, num_classes, channels=channels[-4:], strides=strides[-4:],
                         **options)
    if check_cost:
        _warn_cost(model, backbone)
    return model


def default_image_size(backbone) -> tuple[int, int]:
    """The input size a backbone is made for: a timm model's fixed ``patch_embed`` size, else its
    ``pretrained_cfg`` input size, else 224 x 224."""
    fixed = getattr(getattr(backbone, "patch_embed", None), "img_size", None)
    if isinstance(fixed, (tuple, list)) and len(fixed) == 2:
        return int(fixed[0]), int(fixed[1])
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and len(size) == 3:
        return int(size[1]), int(size[2])
    return 224, 224


def _warn_cost(model, backbone) -> None:
    if len({(p.device, p.dtype) for p in model.parameters()}) != 1:
        # The backbone is on another device or dtype than the new students (the caller moves the whole later).
        return
    size = default_image_size(backbone)
    try:
        message = cost_warning(model, size)
    except (RuntimeError, ValueError, AssertionError):
        # The model cannot run at that size (made for another input): there is no cost to report.
        return
    if message is not None:
        warnings.warn(f"{model_name(backbone)}: {message}", StudentCostWarning, stacklevel=3)
