"""timm classifiers as TESKD teachers: the user's model itself, its students on its own multi-scale features.

A timm model with ``forward_intermediates`` (ConvNeXt, EfficientNet, MobileNetV3, RegNet, ResNet / ResNet-D, Swin,
EdgeNeXt, ...) gives the stages s1..s4 as the last four levels of its ``feature_info`` (their channels and
strides), and the teacher's logits and feature come from the model's own head: ``forward_head(final,
pre_logits=True)`` is the teacher feature (the pre-logits, ``head_hidden_size`` wide: 1280 for EfficientNet-B0, 1024
for MobileNetV3 after its ``conv_head``), its classifier gives the logits. The student width W is that pre-logits
width, so the feature loss compares like with like. The model is kept whole, so the deployed teacher is the very
timm model (:func:`teskd_fast.export_teacher`). A classifier that is a 1x1 conv (timm's ``use_conv`` heads: DLA, DPN)
is applied to the pre-logits as the linear map it is.
"""

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision classifiers other than the ResNets, and the timm models to use instead (same architectures).
TORCHVISION_EQUIVALENTS = {
    "ConvNeXt": "convnext_tiny",
    "EfficientNet": "efficientnet_b0",
    "MobileNetV2": "mobilenetv2_100",
    "MobileNetV3": "mobilenetv3_large_100",
    "RegNet": "regnety_008",
    "SwinTransformer": "swin_tiny_patch4_window7_224",
    "VisionTransformer": "vit_base_patch16_224 (plain ViTs have one stride: use swin_*, convnext_* or efficientnet_*)",
    "DenseNet": "densenet121",
    "MaxVit": "maxvit_tiny_tf_224",
}
LEVELS = 4


def is_timm_classifier(model) -> bool:
    """Whether ``model`` is a timm classifier with the feature API TESKD uses (not a ``features_only`` model)."""
    return all(callable(getattr(model, name, None)) for name in ("forward_intermediates", "forward_head",
                                                                "get_classifier"))


def model_name(model) -> str:
    """The timm name of ``model`` (its ``pretrained_cfg``'s architecture), else its class name."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def refuse_torchvision(model) -> None:
    """Raise a ValueError naming the timm equivalent for a torchvision classifier that is not a ResNet."""
    if not type(model).__module__.startswith("torchvision.models"):
        return
    name = type(model).__name__
    instead = TORCHVISION_EQUIVALENTS.get(name, "the timm model of the same architecture")
    raise ValueError(f"wrap() takes torchvision ResNet-family models only; for a torchvision {name}, build the "
                     f"same network with timm (timm.create_model({instead.split()[0]!r}, num_classes=N), e.g. "
                     f"{instead}) and wrap that: its students then sit on its own multi-scale features")


def timm_levels(model) -> tuple[list[int], list[int], int]:
    """``(channels, strides, width)`` of a timm classifier: the last four feature levels and the pre-logits width.

    Raises:
        ValueError: the model has fewer than four feature levels, or their strides do not increase and divide the
            last one (plain ViTs: every level at stride 16), naming the model and what is supported.
    """
    name = model_name(model)
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not all(isinstance(i, dict) for i in info):
        raise ValueError(f"{name} has no feature_info list: TESKD needs a timm model with forward_intermediates and "
                         "four feature levels (ConvNeXt, EfficientNet, MobileNetV3, RegNet, ResNet, Swin, ...)")
    channels = [int(i["num_chs"]) for i in info][-LEVELS:]
    strides = [int(i["reduction"]) for i in info][-LEVELS:]
    if len(info) < LEVELS:
        raise ValueError(f"{name} gives {len(info)} feature level(s) (channels {channels}, strides {strides}); TESKD "
                         f"needs {LEVELS} (ConvNeXt, EfficientNet, MobileNetV3, RegNet, ResNet, Swin, ... have them)")
    if any(b <= a for a, b in itertools.pairwise(strides)) or any(strides[-1] % s for s in strides):
        raise ValueError(f"{name}: its last {LEVELS} feature levels have strides {strides}; TESKD needs increasing "
                         "strides that divide the last one (a pyramid: ConvNeXt, EfficientNet, RegNet, ResNet, "
                         "Swin, ...). Plain ViTs keep one stride and are not supported")
    width = int(getattr(model, "head_hidden_size", None) or model.num_features)
    return channels, strides, width


def prepare_classifier(model, num_classes) -> nn.Module:
    """``model`` with ``num_classes`` outputs (its classifier reset when it has another count), checked for TESKD.

    Raises:
        ValueError: the model's classifier is neither a module on the pre-logits ``[B, W]`` (a linear) nor a 1x1
            conv (naming the model and the classifier).
    """
    timm_levels(model)
    if getattr(model, "num_classes", None) != num_classes:
        model.reset_classifier(num_classes)
    classifier = model.get_classifier()
    if isinstance(classifier, (tuple, list)) or (
            isinstance(classifier, nn.Conv2d) and (classifier.kernel_size != (1, 1) or classifier.groups != 1)):
        raise ValueError(f"{model_name(model)}: its classifier ({classifier}) is not a linear map of the pre-logits "
                         "features (a linear or a 1x1 conv); TESKD takes the teacher's logits from it")
    return model


def classify(classifier, feature) -> torch.Tensor:
    """``classifier`` (the timm model's, from ``get_classifier()``) on the pre-logits ``feature`` ``[B, W]``.

    A 1x1 conv classifier (DLA, DPN: timm's ``use_conv`` heads, which run on ``[B, W, 1, 1]``) is the linear map
    of its ``[O, W]`` weight: the same logits ``[B, O]`` as the model's own head.
    """
    if isinstance(classifier, nn.Conv2d):
        return F.linear(feature, classifier.weight.flatten(1), classifier.bias)
    return classifier(feature)
