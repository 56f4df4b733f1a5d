"""Training recipes of timm backbone families: the optimiser settings their authors published, scaled to the run.

``teskd-train --arch timm/NAME`` takes the recipe of NAME's family (:func:`family_recipe`, by name prefix) over the
preset's optimiser settings, unless a flag or ``--config`` gives them. What is kept from the preset: the epochs,
the batch size, the data and the loss. What the recipe sets:

- the optimiser, its weight decay (and whether norm weights and biases decay), betas, warm-up, schedule, label
  smoothing, gradient clipping and the teacher's EMA, as published;
- the peak learning rate, scaled from the published batch to the run's ``--batch-size`` by the rule timm's
  ``train.py`` uses when it scales ``--lr-base`` (``--lr-base-scale``): the square root of the batch ratio for the
  Adam family, linear for SGD;
- the warm-up as the same fraction of ``--epochs`` as in the published schedule.

The EMA decay is the published one; its timm ``ModelEmaV3`` warm-up (:mod:`teskd_fast.train.ema`) is what makes it
useful in runs of a few hundred steps (the digits demo) as well as in the published ones.

Families without a recipe here keep the preset's (SGD) settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """A family's published settings.

    Args:
        source: where each number comes from.
        opt: ``"sgd"`` or ``"adamw"``.
        lr: the peak learning rate at ``batch``.
        batch: the published global batch.
        weight_decay: as published (decoupled for AdamW).
        warmup: the warm-up's fraction of the training epochs (published warm-up epochs / epochs).
        settings: the other fields set (``ema_decay``, ``label_smoothing``, ``clip_grad``, ...).
    """

    source: str
    opt: str
    lr: float
    batch: int
    weight_decay: float
    warmup: float
    settings: tuple[tuple[str, Any], ...] = ()

    def lr_at(self, batch_size: int) -> float:
        """The peak learning rate for a global batch of ``batch_size``: timm's sqrt rule for AdamW, linear for SGD."""
        ratio = batch_size / self.batch
        return self.lr * (math.sqrt(ratio) if self.opt == "adamw" else ratio)


# Family name prefix (timm's model names) -> its recipe.
RECIPES: dict[str, Recipe] = {
    "convnext": Recipe(
        source="ConvNeXt (Liu et al. 2022, 'A ConvNet for the 2020s', appendix A.1, table 5, ImageNet-1K): AdamW "
        "lr 4e-3 at batch 4096, betas 0.9/0.999, weight decay 0.05, 20 warm-up epochs of 300, cosine decay, label "
        "smoothing 0.1, EMA 0.9999 (the EMA and no decay on 1-D parameters as in timm's train.py)",
        opt="adamw", lr=4e-3, batch=4096, weight_decay=0.05, warmup=20 / 300,
        settings=(("schedule", "cosine"), ("betas", (0.9, 0.999)), ("label_smoothing", 0.1), ("ema_decay", 0.9999),
                  ("bn_weight_decay", False)),
    ),
    "swin": Recipe(
        source="Swin Transformer (Liu et al. 2021, section 4.1 and its configs): AdamW lr 1e-3 at batch 1024, weight "
        "decay 0.05, 20 warm-up epochs of 300, cosine decay, gradient clipping at norm 5, label smoothing 0.1",
        opt="adamw", lr=1e-3, batch=1024, weight_decay=0.05, warmup=20 / 300,
        settings=(("schedule", "cosine"), ("betas", (0.9, 0.999)), ("label_smoothing", 0.1), ("clip_grad", 5.0),
                  ("bn_weight_decay", False)),
    ),
    "regnet": Recipe(
        source="RegNet (Radosavovic et al. 2020, 'Designing Network Design Spaces': lr 0.1 per 128 images, weight "
        "decay 5e-5, cosine; torchvision's reference recipe for regnet_x/y: SGD momentum 0.9, lr 0.8 at batch "
        "1024, 5 warm-up epochs of 100)",
        opt="sgd", lr=0.8, batch=1024, weight_decay=5e-5, warmup=5 / 100,
        settings=(("schedule", "cosine"), ("momentum", 0.9), ("nesterov", False), ("label_smoothing", 0.0)),
    ),
}


def family_recipe(name: str) -> Recipe | None:
    """The recipe of timm model ``name``'s family (the longest matching prefix), or None."""
    matches = [prefix for prefix in RECIPES if name.startswith(prefix)]
    return RECIPES[max(matches, key=len)] if matches else None


def apply_recipe(name: str, values: dict[str, Any], overrides: dict[str, Any]) -> Recipe | None:
    """Set ``values`` (a config being resolved) from timm model ``name``'s recipe, except the fields in
    ``overrides`` (given by flag or ``--config``). ``lr`` follows ``values["batch_size"]``."""
    recipe = family_recipe(name)
    if recipe is None:
        return None
    epochs = float(values.get("epochs", 1))
    settings = {"opt": recipe.opt, "lr": recipe.lr_at(int(values.get("batch_size", recipe.batch))),
                "weight_decay": recipe.weight_decay, "warmup_epochs": round(recipe.warmup * epochs, 4),
                **dict(recipe.settings)}
    for field, value in settings.items():
        if field not in overrides:
            values[field] = value
    return recipe
