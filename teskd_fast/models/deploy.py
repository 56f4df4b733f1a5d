"""Deployment: the teacher alone, as a plain torchvision ResNet or the user's own timm model."""

import copy

import torch

from .cpu_conv import UnitStridePointwiseConv2d
from .resnet import build_resnet, resnet_shell
from .teskd import RESNET_MODULES


def export_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """The teacher of a TESKD network as a plain ``torchvision.models.ResNet`` (or timm model), in eval mode.

    Args:
        model: a TESKD network with a torchvision ResNet teacher (from :func:`teskd_fast.create_model`, or from
            :func:`teskd_fast.wrap` on a torchvision ResNet), either formulation, or its
            :func:`teskd_fast.compile_model` module, or either in ``DistributedDataParallel`` / ``DataParallel``.

    Returns:
        A new ``torchvision.models.ResNet`` holding copies of the teacher's weights, contiguous (NCHW) memory
        format, same dtype and device. With the ImageNet stem its state_dict loads strictly into
        ``torchvision.models.<arch>(num_classes=...)``; with the CIFAR stem into the same build with
        ``conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)`` and ``maxpool = nn.Identity()``. Its eval-mode logits equal
        ``model.teacher_forward(x)`` in eval mode.

        For a wrapped timm classifier: a copy of that timm model, unchanged (same class, modules and state_dict
        names), so that its state_dict loads strictly into ``timm.create_model(NAME, num_classes=N)``.
    """
    # DistributedDataParallel / DataParallel and compile_model's module (whose state_dict names carry a "module." or
    # "_orig_mod." prefix) hold the network inside, in any nesting.
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            break
    kind = getattr(model, "kind", None)
    if kind == "timm":
        net = copy.deepcopy(model.backbone)
        # The CPU work-around of cpu_conv changed only the class of some convs: the plain nn.Conv2d again.
        for module in net.modules():
            if type(module) is UnitStridePointwiseConv2d:
                module.__class__ = torch.nn.Conv2d
        return net.to(memory_format=torch.contiguous_format).eval()
    if kind != "resnet":
        raise TypeError("export_teacher needs a TESKD network with a torchvision ResNet teacher or a timm "
                        f"classifier teacher (teskd_fast.wrap(timm.create_model(...))), got {type(model)}")
    teacher_keys = tuple(f"{name}." for name in RESNET_MODULES + ("fc",))
    state = {k: v for k, v in model.state_dict().items() if k.startswith(teacher_keys)}
    if getattr(model, "arch", None) is not None:
        net = build_resnet(model.arch, model.num_classes, model.stem, model.width_factor)
        net.load_state_dict(state, strict=True)
    else:
        # A wrapped torchvision model: copies of its modules in a fresh ResNet.
        net = resnet_shell()
        for name in RESNET_MODULES + ("fc",):
            setattr(net, name, copy.deepcopy(getattr(model, name)))
        net.inplanes = model.channels[3]
    ref = next(model.parameters())
    return net.to(device=ref.device, dtype=ref.dtype, memory_format=torch.contiguous_format).eval()
