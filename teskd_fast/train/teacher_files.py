"""The deployable teacher of a run: ``teacher.safetensors`` written, and :func:`load_teacher` reading any of a
run's files back into the plain model.

A finished run writes ``teacher.pt`` (a torch state_dict), ``teacher.safetensors`` (the same tensors, with
metadata naming the architecture and class count) and ``teacher.json`` (how to rebuild the model);
:func:`load_teacher` takes the run folder or any of its weights files (``teacher.safetensors``, ``teacher.pt``,
``best.pt``, ``last.pt``: so an unfinished run too) and returns the plain teacher: a ``torchvision.models.ResNet``
of the run's stem and width, or the timm model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teskd_fast.train.archs import timm_name
from teskd_fast.train.checkpoint import (
    CHECKPOINT_FORMAT,
    RUN_TEACHER,
    CheckpointError,
    atomic_write_bytes,
    read_weights,
    weights_path,
)


def teacher_metadata(arch: str, num_classes: int, stem: str, width: float) -> dict[str, str]:
    """What ``teacher.safetensors`` says about its network (safetensors metadata are strings)."""
    import teskd_fast

    info = {"format": "pt", "producer": f"teskd_fast {teskd_fast.__version__}", "arch": arch,
            "num_classes": str(num_classes)}
    name = timm_name(arch)
    if name is not None:
        info["timm"] = name
    else:
        info.update(stem=stem, width=repr(float(width)))
    return info


def write_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``state`` (CPU tensors) to a ``.safetensors`` file at ``path``, atomically."""
    from safetensors.torch import save

    # safetensors refuses tensors that share memory: each one its own contiguous copy.
    data = save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def _network_of(path: Path, obj: Any, metadata: dict[str, str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``({"arch", "num_classes", "stem", "width"}, teacher state_dict)`` of a loaded run file."""
    import json

    from teskd_fast.train.init_weights import state_dict_of, teacher_part

    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        cfg = obj.get("config", {})
        info = {"arch": cfg.get("arch"), "num_classes": obj.get("num_classes"), "stem": cfg.get("stem"),
                "width": cfg.get("width")}
        return info, teacher_part(state_dict_of(obj["model"], path, "load_teacher"))
    state = state_dict_of(obj, path, "load_teacher")
    if "arch" in metadata:
        info = {"arch": metadata["arch"], "num_classes": int(metadata["num_classes"]), "stem": metadata.get("stem"),
                "width": float(metadata["width"]) if "width" in metadata else None}
        return info, state
    info_path = path.with_suffix(".json")
    if not info_path.is_file():
        raise ValueError(f"load_teacher {path}: which network it is cannot be told: no {info_path.name} beside it "
                         "(and no metadata in the file); give the run folder or a teskd-train checkpoint")
    try:
        info = json.loads(info_path.read_text())
    except ValueError as e:
        raise ValueError(f"load_teacher {path}: {info_path} is not JSON ({e})") from None
    return info, state


def load_teacher(source: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The plain teacher of a teskd-train run, in eval mode, built and loaded strictly.

    Args:
        source: a run folder (its ``teacher.safetensors``, else ``teacher.pt``, ``best.pt``, ``last.pt``) or one
            of those files. Files are read without running anything they hold (safetensors, or PyTorch's restricted
            unpickler).
        device: where the model goes.

    Returns:
        for a ResNet run, a ``torchvision.models.ResNet`` of the run's stem and width (at width 1 with the ImageNet
        stem, exactly ``torchvision.models.<arch>(num_classes=N)``); for ``--arch timm/NAME``, the timm model
        ``timm.create_model(NAME, num_classes=N)``. Its eval logits are the run's teacher's.

    Raises:
        FileNotFoundError: no such file, or a folder with none of those files.
        ValueError: a file that is not a run's (refused as unsafe, corrupt, not a state_dict, or of an unknown
            network); the message names it.
    """
    from teskd_fast.models.resnet import build_resnet
    from teskd_fast.models.teskd import check_state_dict
    from teskd_fast.train.config import ConfigError

    path = weights_path(source, "load_teacher", RUN_TEACHER)
    try:
        obj, metadata = read_weights(path)
        info, state = _network_of(path, obj, metadata)
    except (CheckpointError, ConfigError) as e:
        raise ValueError(str(e)) from None
    arch, num_classes = info.get("arch"), info.get("num_classes")
    if not isinstance(arch, str) or not isinstance(num_classes, int):
        raise ValueError(f"load_teacher {path}: the architecture or class count is missing ({info})")
    name = timm_name(arch)
    if name is not None:
        import timm

        net = timm.create_model(name, num_classes=num_classes, pretrained=False)
    else:
        net = build_resnet(arch, num_classes, stem=info.get("stem") or "imagenet", width=info.get("width") or 1.0)
    try:
        check_state_dict(state, net.state_dict(), f"the {arch} teacher ({num_classes} classes)")
    except (TypeError, ValueError) as e:
        raise ValueError(f"load_teacher {path}: {e}") from None
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()
