"""The loss's specification, defined (and checked) beside the kernels in ``teskd_fast.kernels.options``, the
lowest layer; re-exported here for the loss API and its users: ``LossOptions`` (the record of the loss's scalar
options), ``SPEC`` (each option's name, type, default, range and meaning) and ``PARTS`` (the loss's parts)."""

from teskd_fast.kernels.options import (
    BASELINE_PARTS,
    PART_WEIGHTS,
    PARTS,
    SPEC,
    SUMMED_PARTS,
    LossOptions,
    Option,
    Range,
    convert,
)

__all__ = [
    "BASELINE_PARTS", "PARTS", "PART_WEIGHTS", "SPEC", "SUMMED_PARTS", "LossOptions", "Option", "Range", "convert",
]
