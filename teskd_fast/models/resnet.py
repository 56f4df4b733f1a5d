"""The ResNet-family teachers: plain torchvision ``ResNet`` objects with a CIFAR or ImageNet stem and a width factor.

Every network built here is an instance of ``torchvision.models.ResNet`` with torchvision's module names, so its
state_dict is the reference implementation's backbone state_dict, and at ``width=1`` with the ImageNet stem it
loads strictly into ``torchvision.models.<arch>()``.
"""

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# arch -> (block, blocks per stage, groups, width_per_group)
ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 1, 128),
}
STEMS = ("cifar", "imagenet")


def check_arch(arch: str, stem: str, width: float) -> None:
    """Raise a ValueError naming the problem when ``arch``, ``stem`` or ``width`` is not supported."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose 'cifar' (3x3 stride-1 conv, no max-pool) or 'imagenet'")
    if not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    _, _, groups, width_per_group = ARCHS[arch]
    for planes in (64, 128, 256, 512):
        if _scaled(planes, width) < 1 or int(_scaled(planes, width) * width_per_group / 64) < 1:
            raise ValueError(f"width={width} is too small for {arch}: a stage or a group would have no channel")


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width))) if width != 1 else channels


def build_resnet(arch: str, num_classes: int, stem: str = "imagenet", width: float = 1.0) -> ResNet:
    """A plain torchvision ``ResNet`` with the given stem and every channel count scaled by ``width``.

    Args:
        arch: one of ``ARCHS``.
        num_classes: outputs of ``fc``.
        stem: ``"imagenet"`` (7x7 stride-2 conv, max-pool) or ``"cifar"`` (3x3 stride-1 conv, ``maxpool`` an
            ``nn.Identity``).
        width: factor on every channel count (64, 128, 256, 512 and the stem); 1.0 is the published network.

    Returns:
        ``torchvision.models.ResNet``. Initialisation follows the reference: with the ImageNet stem torchvision's
        (kaiming-normal fan_out convs, BN weight 1 and bias 0); with the CIFAR stem PyTorch's defaults everywhere.
    """
    check_arch(arch, stem, width)
    block, layers, groups, width_per_group = ARCHS[arch]
    if stem == "imagenet" and width == 1:
        return ResNet(block, list(layers), num_classes, groups=groups, width_per_group=width_per_group)
    # Torchvision's constructor has no width factor and no CIFAR stem: its modules are replaced by ours, made in
    # its order (the same random numbers drawn for the same seed), from its public blocks, under its names.
    net = resnet_shell(block, groups, width_per_group)
    inplanes = _scaled(64, width)
    if stem == "imagenet":
        net.conv1 = nn.Conv2d(3, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        net.conv1 = nn.Conv2d(3, inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.bn1 = nn.BatchNorm2d(inplanes)
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        stage = _stage(block, inplanes, _scaled(planes, width), blocks, 1 if i == 0 else 2, groups, width_per_group)
        setattr(net, f"layer{i + 1}", stage)
        inplanes = _scaled(planes, width) * block.expansion
    net.fc = nn.Linear(inplanes, num_classes)
    net.inplanes = inplanes  # the channels into fc, as torchvision's constructor leaves it
    if stem == "imagenet":
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    return net


def resnet_shell(
    block: type[BasicBlock | Bottleneck] = BasicBlock, groups: int = 1, width_per_group: int = 64
) -> ResNet:
    """A torchvision ``ResNet`` whose modules are placeholders on the meta device, for the caller to replace.

    Made by torchvision's constructor on the meta device: no memory, no random numbers drawn. Every module that
    holds parameters or buffers (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``) must be replaced."""
    with torch.device("meta"):
        return ResNet(block, [1, 1, 1, 1], groups=groups, width_per_group=width_per_group)


def _stage(block, inplanes, planes, blocks, stride, groups, base_width):
    """``layer<i>``: ``blocks`` torchvision blocks, the first with the stride and the shortcut projection,
    made in the order of torchvision's ``ResNet`` (the projection first)."""
    out = planes * block.expansion
    downsample = None
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out))  # fmt: skip
    first = block(inplanes, planes, stride, downsample, groups=groups, base_width=base_width)
    rest = [block(out, planes, groups=groups, base_width=base_width) for _ in range(1, blocks)]
    return nn.Sequential(first, *rest)


def stage_channels(net: ResNet) -> list[int]:
    """Output channels of ``layer1..layer4`` of a torchvision ResNet."""
    channels = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        last = getattr(net, name)[-1]
        bn = last.bn3 if isinstance(last, Bottleneck) else last.bn2
        channels.append(bn.num_features)
    return channels
