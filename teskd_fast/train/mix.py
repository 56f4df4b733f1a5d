"""CutMix (Yun et al. 2019) in the trainer: whole batches on the device, drawn from ``(seed, epoch, rank, batch)``.

With probability ``cutmix_prob`` a batch gets one box, of area ``1 - lam`` with ``lam ~ Beta(alpha, alpha)``
and a uniform centre (clipped at the border, ``lam`` then recomputed from the clipped area), filled with the
same box of the batch in a random permutation: one slice assignment, no per-image Python. Its targets become a
:class:`MixedTarget` ``(a, b, lam)``: every head's CE is ``lam * CE(a) + (1 - lam) * CE(b)``
(:func:`teskd_fast.loss.mixed.teskd_loss_mixed` for TESKD, the same composition for the baseline's CE); the KD
and feature terms are those of the mixed images.

Every draw of batch ``b`` of epoch ``e`` on rank ``r`` comes from a generator seeded by ``(seed, e, r, b)``
(:func:`teskd_fast.data.common.numpy_generator`), as the loaders draw their order and crops: a run resumed
inside an epoch mixes its remaining batches exactly as an uninterrupted run does, and the global RNG is not
touched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from teskd_fast.data.common import MIX_STREAM, numpy_generator
from teskd_fast.loss.options import BASELINE_PARTS
from teskd_fast.train.config import TrainConfig


class MixedTarget(NamedTuple):
    """The targets of a mixed batch: labels ``a`` of the images, ``b`` of the pasted boxes, ``a``'s weight."""

    a: torch.Tensor
    b: torch.Tensor
    lam: float

    @property
    def shape(self) -> torch.Size:
        return self.a.shape


class CutMix:
    """``cutmix(images, target, epoch, batch) -> (images, target)``; a batch left unmixed keeps its target."""

    def __init__(self, alpha: float, prob: float, seed: int, rank: int = 0):
        if not alpha > 0 or not 0.0 <= prob <= 1.0:
            raise ValueError(f"CutMix: alpha must be > 0 and prob in [0, 1], got alpha={alpha}, prob={prob}")
        self.alpha, self.prob, self.seed, self.rank = alpha, prob, seed, rank

    def box(self, epoch: int, batch: int, n: int, height: int, width: int) \
            -> tuple[torch.Tensor, tuple[int, int, int, int], float] | None:
        """The draw of one batch: ``None`` (left unmixed) or ``(perm, (y0, y1, x0, x1), lam)``."""
        rng = numpy_generator(self.seed, epoch, self.rank, batch, MIX_STREAM)
        if rng.random() >= self.prob:
            return None
        lam = rng.beta(self.alpha, self.alpha)
        cut = (1.0 - lam) ** 0.5
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        perm = torch.from_numpy(rng.permutation(n))
        return perm, (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (height * width)

    def __call__(self, images: torch.Tensor, target: torch.Tensor, epoch: int, batch: int) \
            -> tuple[torch.Tensor, torch.Tensor | MixedTarget]:
        drawn = self.box(epoch, batch, images.shape[0], images.shape[-2], images.shape[-1])
        if drawn is None:
            return images, target
        perm, (y0, y1, x0, x1), lam = drawn
        perm = perm.to(images.device, non_blocking=True)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
        return mixed, MixedTarget(target, target[perm], lam)


def build_mix(cfg: TrainConfig, rank: int) -> Callable:
    """The batch transform of a run: :class:`CutMix` with ``--cutmix-alpha`` > 0, else the identity."""
    if cfg.cutmix_alpha > 0:
        return CutMix(cfg.cutmix_alpha, cfg.cutmix_prob, cfg.seed, rank)
    return lambda images, target, epoch, batch: (images, target)


def labels(target) -> torch.Tensor:
    """The class labels a training accuracy counts: a mixed batch's majority side (``a`` when ``lam >= 1/2``)."""
    if isinstance(target, MixedTarget):
        return target.a if target.lam >= 0.5 else target.b
    return target


def with_mixed_targets(criterion: Callable, cfg: TrainConfig) -> Callable:
    """``criterion(out, target)`` that also takes a :class:`MixedTarget` (one loss call per step either way)."""
    from teskd_fast.loss.api import TESKDLoss
    from teskd_fast.loss.mixed import mixed_criterion

    def mixed(out, target):
        if not isinstance(target, MixedTarget):
            return criterion(out, target)
        if isinstance(criterion, TESKDLoss):
            return mixed_criterion(criterion, out, *target)
        a, b, lam = target
        logits = out.float()
        loss = lam * F.cross_entropy(logits, a, label_smoothing=cfg.label_smoothing) \
            + (1.0 - lam) * F.cross_entropy(logits, b, label_smoothing=cfg.label_smoothing)
        (part,) = BASELINE_PARTS
        return loss, {part: loss.detach()}
    return mixed
