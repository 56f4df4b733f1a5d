"""The ResNet-family teachers: plain torchvision ``ResNet`` objects with a CIFAR or ImageNet stem and a width factor.

Every network built here is an instance of ``torchvision.models.ResNet`` with torchvision's module names, so its
state_dict is the reference implementation's backbone state_dict, and at ``width=1`` with the ImageNet stem it
loads strictly into ``torchvision.models.<arch>()``.
"""

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


def check_arch(arch, stem, width):
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


def _scaled(channels, width):
    return max(1, int(round(channels * width))) if width != 1 else channels


def build_resnet(arch, num_classes, stem="imagenet", width=1.0):
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
    # Build through torchvision's own attribute layout and _make_layer, so that names and blocks are torchvision's.
    net = ResNet.__new__(ResNet)
    nn.Module.__init__(net)
    net._norm_layer = nn.BatchNorm2d
    net.inplanes = _scaled(64, width)
    net.dilation = 1
    net.groups = groups
    net.base_width = width_per_group
    if stem == "imagenet":
        net.conv1 = nn.Conv2d(3, net.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        net.conv1 = nn.Conv2d(3, net.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(net.inplanes)
    net.relu = nn.ReLU(inplace=True)
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
    net.layer1 = net._make_layer(block, _scaled(64, width), layers[0])
    net.layer2 = net._make_layer(block, _scaled(128, width), layers[1], stride=2)
    net.layer3 = net._make_layer(block, _scaled(256, width), layers[2], stride=2)
    net.layer4 = net._make_layer(block, _scaled(512, width), layers[3], stride=2)
    net.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    net.fc = nn.Linear(_scaled(512, width) * block.expansion, num_classes)
    if stem == "imagenet":
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
    return net


def stage_channels(net):
    """Output channels of ``layer1..layer4`` of a torchvision ResNet."""
    channels = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        last = getattr(net, name)[-1]
        bn = last.bn3 if isinstance(last, Bottleneck) else last.bn2
        channels.append(bn.num_features)
    return channels
