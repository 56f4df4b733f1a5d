"""An exponential moving average (EMA) of the teacher's weights, as timm's ``ModelEmaV3`` with its warm-up.

After optimiser step ``n`` (1-based, counted over the run), every floating-point parameter and buffer ``e`` of the
teacher moves towards the trained teacher's ``w``::

    e <- e + (1 - d_n) (w - e)
    d_n = 0                                                 for n <= 1 (the first step copies the teacher)
    d_n = min(decay, 1 - (1 + (n - 1) / gamma) ** -power)   otherwise, with gamma = 1 and power = 2/3

(timm's ``ModelEmaV3.get_decay`` with ``use_warmup=True``, ``update_after_step=0``, ``min_decay=0`` and its
default ``warmup_gamma`` and ``warmup_power``); integer buffers (BatchNorm's ``num_batches_tracked``) are copied.
The warm-up lets the average follow the fast early training and reach the full ``decay`` only after
``(1 - decay) ** (-3/2)`` steps (1e6 steps for 0.9999): in a short run the decay stays near ``1 - n ** (-2/3)``.

Only the teacher is averaged (the students exist for training only): the TESKD network's entries outside the student
modules, or the whole network of a baseline run. The average is kept in a full copy of the network, so that the EMA
teacher is evaluated and exported by the same code as the raw one; its student modules are never used.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

# The modules of a TESKD network (teskd_fast.models.teskd.TESKDNet) that belong to the students.
STUDENT_MODULES = frozenset({"laterals", "upsample", "fuse_1", "fuse_2", "fuse_3", "downsample1", "downsample2",
                             "downsample3", "fc_b1", "fc_b2", "fc_b3"})
WARMUP_GAMMA = 1.0
WARMUP_POWER = 2.0 / 3.0


def ema_decay(decay: float, step: int) -> float:
    """timm ``ModelEmaV3``'s decay after optimiser step ``step`` (1-based), with the warm-up (see the module)."""
    n = max(0, step - 1)
    if n <= 0:
        return 0.0
    return max(min(1.0 - (1.0 + n / WARMUP_GAMMA) ** -WARMUP_POWER, decay), 0.0)


def teacher_keys(model: nn.Module) -> list[str]:
    """The state_dict names of ``model``'s teacher: every entry of a TESKD network outside its student modules
    (every entry of a plain network)."""
    model = getattr(model, "_orig_mod", model)
    return [k for k in model.state_dict() if k.split(".", 1)[0] not in STUDENT_MODULES]


class TeacherEMA:
    """The EMA of ``model``'s teacher (see the module).

    Args:
        model: the network trained (a TESKD network or, in a baseline run, the teacher alone), not compiled or
            wrapped in DDP.
        decay: the EMA's decay after the warm-up, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.keys = teacher_keys(model)
        self.updates = 0
        self._pairs(model)

    def _pairs(self, model: nn.Module) -> None:
        ours, theirs = self.module.state_dict(), model.state_dict()
        self._float = [(ours[k], theirs[k]) for k in self.keys if ours[k].is_floating_point()]
        self._other = [(ours[k], theirs[k]) for k in self.keys if not ours[k].is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the trained teacher after optimiser step ``step`` (1-based, over the run)."""
        weight = 1.0 - ema_decay(self.decay, step)
        if self._float:
            torch._foreach_lerp_([e for e, _ in self._float], [w.to(e.dtype) for e, w in self._float], weight)
        for e, w in self._other:
            e.copy_(w)
        self.updates = step

    def teacher_forward(self, images: torch.Tensor) -> torch.Tensor:
        """The EMA teacher's logits ``[B, C]`` for ``images`` ``[B, 3, H, W]`` (eval mode, no gradient)."""
        with torch.no_grad():
            net = self.module
            return net.teacher_forward(images) if hasattr(net, "teacher_forward") else net(images)

    def state_dict(self) -> dict[str, Any]:
        """The averaged teacher entries, the decay and the step count: tensors, numbers and strings only."""
        state = self.module.state_dict()
        return {"decay": self.decay, "updates": self.updates,
                "teacher": {k: state[k].detach().clone() for k in self.keys}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["teacher"]
        if sorted(saved) != sorted(self.keys):
            raise ValueError("the checkpoint's EMA does not hold this model's teacher entries")
        with torch.no_grad():
            ours = self.module.state_dict()
            for k in self.keys:
                ours[k].copy_(saved[k])
        self.updates = int(state["updates"])
