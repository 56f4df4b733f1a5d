"""``--init PATH``: the teacher (backbone and head) starts from a local state_dict of the plain model.

Accepted: a plain model's ``state_dict`` in a ``.safetensors`` file (as model hubs publish weights; a previous
run's ``teacher.safetensors``) or a torch file (timm, torchvision, a previous run's ``teacher.pt``), or a checkpoint
holding one under ``state_dict`` / ``model`` / ``state_dict_ema`` (timm's ``train.py``, with its ``args``
Namespace; teskd-train's ``last.pt`` and ``best.pt``, whose TESKD network's teacher part is taken, for either
method). A run folder stands for the first of its ``teacher.safetensors``, ``teacher.pt``, ``best.pt``,
``last.pt`` (the run says which). A ``module.`` (DDP) or ``model.`` prefix on every key is removed. The keys and
shapes must be the teacher's exactly (the first mismatched keys are named), except the classifier: one of another
class count is left fresh, and the run says so. The students always start fresh. Nothing is downloaded, and
nothing in the file is run: torch files are read with PyTorch's restricted unpickler
(:mod:`teskd_fast.serialization`), and one that needs more is refused naming the type it holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from teskd_fast.train.checkpoint import RUN_TEACHER, CheckpointError, read_weights, weights_path
from teskd_fast.train.config import ConfigError


def plain_teacher(model: nn.Module) -> tuple[nn.Module, str]:
    """``(module, prefix)``: the plain teacher inside ``model`` and the prefix of its keys in ``model``'s state_dict.

    A timm teacher (wrapped or alone) is the timm model; a torchvision ResNet teacher is the TESKD network's
    ``conv1 ... layer4, fc`` (the same names as the plain ResNet's)."""
    if getattr(model, "kind", None) == "timm":
        return model.backbone, "backbone."
    return model, ""


def head_keys(teacher: nn.Module) -> set[str]:
    """The state_dict keys of ``teacher``'s classifier (timm's ``get_classifier()``, a ResNet's ``fc``)."""
    head = teacher.get_classifier() if callable(getattr(teacher, "get_classifier", None)) else teacher.fc
    names = [name for name, module in teacher.named_modules() if module is head]
    return {f"{names[0]}.{k}" for k in head.state_dict()} if names else set()


def _read(path: Path, say=print) -> dict:
    try:
        found = weights_path(path, "--init", RUN_TEACHER)
        if found != path:
            say(f"teskd-train: --init {path}: a run folder: its {found.name}", file=sys.stderr)
        return read_weights(found)[0]
    except (FileNotFoundError, CheckpointError) as e:
        text = str(e)
        raise ConfigError(text if text.startswith("--init") else f"--init: {text}") from None


def state_dict_of(obj, path: str | Path, flag: str = "--init") -> dict[str, torch.Tensor]:
    """The model state_dict a loaded weights file holds (itself, or a checkpoint's ``state_dict`` / ``model`` /
    ``state_dict_ema`` / ``teacher_state_dict`` entry), its keys without a ``module.`` or ``model.`` prefix that
    every key carries.

    Raises:
        ConfigError: no state_dict there (an empty dict, keys that are not names, values that are not tensors);
            the message begins with ``flag`` and ``path``.
    """
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema", "teacher_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if isinstance(obj, dict) and not obj:
        raise ConfigError(f"{flag} {path}: holds an empty dict (no weights); expected a state_dict of the model")
    if not isinstance(obj, dict):
        raise ConfigError(f"{flag} {path}: expected a state_dict (a dict of tensors) or a checkpoint holding one "
                          f"under 'state_dict' or 'model', got a {type(obj).__name__}")
    other = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        raise ConfigError(f"{flag} {path}: expected a state_dict (a dict of tensors) or a checkpoint holding one "
                          f"under 'state_dict' or 'model'; its entry {other!r} is a {type(obj[other]).__name__}")
    odd = next((k for k in obj if not isinstance(k, str)), None)
    if odd is not None:
        raise ConfigError(f"{flag} {path}: its keys are not parameter names (e.g. {odd!r}, a {type(odd).__name__}); "
                          "expected a state_dict of the model")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return dict(obj)


def teacher_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's entries of a TESKD network's state_dict (a timm teacher's ``backbone.*`` without the prefix;
    a ResNet teacher's ``conv1 ... layer4, fc``); any other state_dict as it is."""
    from teskd_fast.models.teskd import RESNET_MODULES

    if not any(k.startswith("laterals.") for k in state):
        return state
    if any(k.startswith("backbone.") for k in state):
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    resnet = tuple(f"{name}." for name in RESNET_MODULES + ("fc",))
    return {k: v for k, v in state.items() if k.startswith(resnet)}


def load_teacher_init(model: nn.Module, path: str, say=print) -> list[str]:
    """Load ``path`` into the teacher of ``model`` (a TESKD network or a plain teacher), in place.

    Returns:
        the classifier keys left fresh (another class count), empty when the whole teacher was loaded.

    Raises:
        ConfigError: the file is missing or holds no state_dict, or its keys or shapes are not the teacher's (the
            first missing / unexpected keys, or the first wrong shapes, are named).
    """
    from teskd_fast.models.teskd import check_state_dict

    path = Path(path).expanduser()
    teacher, prefix = plain_teacher(model)
    state = teacher_part(state_dict_of(_read(path, say), path))
    expected = teacher_part(model.state_dict())
    fresh = sorted(k for k in head_keys(teacher)
                   if k in state and k in expected and state[k].shape != expected[k].shape)
    given = {k: tuple(state[k].shape) for k in fresh}
    for k in fresh:
        state[k] = expected[k]
    try:
        check_state_dict(state, expected, f"the teacher ({type(teacher).__name__})")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--init {path}: {e}") from None
    teacher.load_state_dict({**teacher.state_dict(), **state} if prefix == "" else state, strict=True)
    if fresh:
        head = next(k for k in fresh if k.endswith("weight"))
        say(f"teskd-train: --init {path}: its classifier has {given[head][0]} classes, this run "
            f"{expected[head].shape[0]}: a new classifier ({', '.join(fresh)})", file=sys.stderr)
    else:  # a successful --init is said too: nothing else on screen shows the weights were used
        say(f"teskd-train: --init {path}: the teacher loaded ({len(state)} tensors, classifier included); "
            "the students start fresh")
    return fresh

