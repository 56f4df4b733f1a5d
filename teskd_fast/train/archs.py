"""The ``--arch`` names: the torchvision ResNets of :data:`teskd_fast.models.resnet.ARCHS` and ``timm/NAME``.

A timm backbone is any name timm has (timm is optional); the preset values that only a ResNet understands give way
for it (:func:`timm_defaults`).
"""

from __future__ import annotations

from typing import Any

TIMM_PREFIX = "timm/"
# Digits are 8x8: a timm backbone (stride-32 features, stems that refuse tiny inputs) sees them resized to this.
TIMM_DIGITS_SIZE = 32


class ArchChoices(tuple):
    """The ``--arch`` names: the ResNet registry's (listed, iterated) and any ``timm/NAME`` (accepted: argparse
    and :func:`teskd_fast.train.config.validate` ask ``in``; whether timm has NAME is
    :func:`teskd_fast.train.config.check_timm_arch`'s business)."""

    def __contains__(self, name) -> bool:
        return tuple.__contains__(self, name) or (isinstance(name, str) and name.startswith(TIMM_PREFIX)
                                                   and len(name) > len(TIMM_PREFIX))


def timm_name(arch: str) -> str | None:
    """``NAME`` for ``--arch timm/NAME``, else None."""
    return arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else None


def timm_defaults(values: dict[str, Any], overrides: dict[str, Any]) -> None:
    """A preset's ResNet-only values, for a timm backbone: width 1 (a timm model has no width factor) and, on the
    8x8 digits, images resized to :data:`TIMM_DIGITS_SIZE` (stride-32 features would be empty), unless given; and
    the optimiser settings of the model's family (:mod:`teskd_fast.train.recipes`), unless given."""
    from teskd_fast.train.recipes import apply_recipe

    apply_recipe(timm_name(values["arch"]), values, overrides)
    if "width" not in overrides:
        values["width"] = 1.0
    if values.get("dataset") == "digits":
        for name in ("image_size", "val_image_size", "val_resize"):
            if name not in overrides and values.get(name, 0) < TIMM_DIGITS_SIZE:
                values[name] = TIMM_DIGITS_SIZE
