"""Schedules of a run, functions of the config and the position in training: the learning rate, the image size.

Both are computed on the host from the config alone, so nothing about them is saved in a checkpoint: a
resumed run recomputes them, and an extended run (a larger ``epochs``) follows the new total.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the configuration imports this module (its --schedule choices): a type name only, never run
    from teskd_fast.train.config import TrainConfig


class LRSchedule:
    """Learning rate as a function of (epoch, step in epoch): warm-up, then multistep, cosine or linear decay.

    Computed on the host from the config, so a resumed or extended run (a larger ``epochs``) follows the new total.
    Multistep decays at whole epochs, as the reference's per-epoch ``MultiStepLR``.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int):
        self.cfg, self.steps_per_epoch = cfg, max(1, steps_per_epoch)

    def __call__(self, epoch: int, step_in_epoch: int) -> float:
        cfg, n = self.cfg, self.steps_per_epoch
        t = epoch + step_in_epoch / n
        if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
            # At most the peak: a warm-up shorter than one step would otherwise overshoot it.
            return cfg.lr * min(1.0, (epoch * n + step_in_epoch + 1) / (cfg.warmup_epochs * n))
        frac = (t - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
        return cfg.lr * SCHEDULES[cfg.schedule](cfg, epoch, min(max(frac, 0.0), 1.0))


def _multistep(cfg: TrainConfig, epoch: int, frac: float) -> float:
    # Whole epochs, as the reference's per-epoch MultiStepLR.
    return cfg.lr_gamma ** sum(epoch >= round(m * cfg.epochs) for m in cfg.lr_milestones)


def _cosine(cfg: TrainConfig, epoch: int, frac: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * frac))


def _linear(cfg: TrainConfig, epoch: int, frac: float) -> float:
    return 1.0 - frac


# --schedule NAME -> the factor on the peak learning rate after the warm-up, a function of (config, epoch, the
# fraction of the post-warm-up training done, in [0, 1]).
SCHEDULES: dict[str, Callable[[TrainConfig, int, float], float]] = {
    "multistep": _multistep, "cosine": _cosine, "linear": _linear,
}


def image_size_at(cfg: TrainConfig, epoch: int) -> int:
    """Progressive resizing: training size for epoch ``epoch`` (0-based), a multiple of 32 ramping linearly."""
    if not cfg.image_size_start:
        return cfg.image_size
    end = max(1, round(cfg.progressive_end * cfg.epochs) - 1)
    frac = min(1.0, epoch / end)
    size = cfg.image_size_start + frac * (cfg.image_size - cfg.image_size_start)
    return int(round(size / 32) * 32)
