"""Building TESKD networks: :func:`create_model` for the ResNet zoo, :func:`wrap` for any backbone."""

import torch
import torch.nn as nn

from .cpu_conv import avoid_strided_pointwise_bug
from .fast import FastTESKDNet
from .resnet import build_resnet, check_arch
from .teskd import TESKDNet
from .timm_backbone import is_timm_classifier, refuse_torchvision

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


def create_model(arch, num_classes, stem="cifar", formulation="fast", width=1.0) -> TESKDNet:
    """A ResNet-family teacher with three TESKD students.

    Args:
        arch: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnext50_32x4d`` or ``wide_resnet50_2``.
        num_classes: classes of the teacher and of each student.
        stem: ``"cifar"`` (3x3 stride-1 conv, no max-pool; 32x32 inputs give stages at 32, 16, 8, 4) or
            ``"imagenet"`` (torchvision's 7x7 stride-2 conv and max-pool; 224 gives 56, 28, 14, 7).
        formulation: ``"fast"`` (default; same parameters and function, fewer operations, channels-last) or
            ``"faithful"`` (the reference's modules, called one by one).
        width: factor on every channel count (1.0: the published networks; smaller for demos and tests).

    Returns:
        :class:`~teskd_fast.models.teskd.TESKDNet` (faithful) or :class:`~teskd_fast.models.fast.FastTESKDNet`;
        both have the reference implementation's state_dict names and shapes, and the reference's initialisation
        (ImageNet stem: kaiming-normal backbone convs; CIFAR stem: PyTorch defaults; students: PyTorch defaults).
        ``model(x)`` gives a :class:`teskd_fast.TESKDOutput`; ``model.teacher_forward(x)`` the teacher's logits.

    Shapes:
        x: ``[B, 3, H, W]``, any H, W the backbone accepts; logits ``[B, num_classes]``.
    """
    check_arch(arch, stem, width)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = _network(formulation, build_resnet(arch, num_classes, stem, width), num_classes)
    model.arch, model.stem, model.width_factor = arch, stem, float(width)
    return model


def wrap(backbone, num_classes, formulation="fast") -> TESKDNet:
    """Build the TESKD students on an existing backbone, which becomes the teacher.

    Args:
        backbone: a torchvision ResNet-family model (``resnet*``, ``resnext*``, ``wide_resnet*``, any stem; its
            modules are taken over, not copied, and its ``fc`` is kept when it already has ``num_classes``
            outputs); a timm classifier, ``timm.create_model(NAME, num_classes=N)``, with ``forward_intermediates``
            (ConvNeXt, EfficientNet, MobileNetV3, RegNet, ResNet / ResNet-D, Swin, ...: kept whole, its own head
            is the teacher's, its classifier reset when it has another class count; the students sit on its last
            four feature levels and are as wide as its pre-logits); or a timm model created with
            ``features_only=True`` (its ``feature_info`` gives the channels and strides of the last four feature
            maps, the stages s1..s4; the teacher head is then a new pooling + linear).
        num_classes: classes of the teacher and of each student.
        formulation: ``"fast"`` or ``"faithful"``.

    Returns:
        A TESKD network as :func:`create_model` gives; the students' width W is the last stage's channels, or a
        timm classifier's pre-logits width. :func:`teskd_fast.export_teacher` gives back the plain model.

    Raises:
        ValueError: a timm model with fewer than four feature levels or without a stride pyramid (plain ViTs), or a
            torchvision classifier that is not a ResNet (the message names the timm model to use instead).
        TypeError: anything else that is not one of the above.
    """
    from torchvision.models import ResNet

    if isinstance(backbone, ResNet):
        fc = backbone.fc
        if not isinstance(fc, nn.Linear) or fc.out_features != num_classes:
            fc = None
        return _network(formulation, backbone, num_classes, fc=fc)
    if is_timm_classifier(backbone):
        return _network(formulation, backbone, num_classes)
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
    return _network(formulation, backbone, num_classes, channels=channels[-4:], strides=strides[-4:])
