"""The loss's scalar options, in one record that every backend takes as it is, with their one check.

It lives with the kernels, the lowest layer (``teskd_fast.loss.options`` re-exports it). Only two boundaries
flatten it, both by field name: the C kernel's ``ctypes`` struct and the Triton kernels' scalar arguments (the
custom op's schema takes the fields as named arguments).
"""

import math
from typing import NamedTuple


class LossOptions(NamedTuple):
    """The TESKD loss's options (see :func:`teskd_fast.teskd_loss` for their meaning).

    A tuple: hashable (kernels cache per options), immutable, and a constant to ``torch.compile``.
    """

    temperature: float = 4.0
    ce_weight: float = 0.2
    kd_weight: float = 0.8
    feat_weight: float = 1e-7
    kd_eps: float = 1e-7
    detach_teacher: bool = False
    label_smoothing: float = 0.0
    ignore_index: int = -100

    @classmethod
    def checked(cls, **options) -> "LossOptions":
        """The record of ``options`` (names as the fields), converted and checked: a ValueError names a bad one."""
        temperature = options.get("temperature", cls._field_defaults["temperature"])
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
        opts = cls(*(field_type(v) for field_type, v in zip(_TYPES, cls(**options))))
        for name in ("ce_weight", "kd_weight", "feat_weight"):
            if not math.isfinite(getattr(opts, name)):
                raise ValueError(f"{name}: must be finite, got {options.get(name)!r}")
        if not (opts.kd_eps >= 0 and math.isfinite(opts.kd_eps)):
            raise ValueError(f"kd_eps: must be finite and >= 0, got {options.get('kd_eps')!r}")
        if not 0.0 <= opts.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing: must lie in [0, 1], got {options.get('label_smoothing')!r}")
        # Targets are int64 (the C kernel and Triton take ignore_index as one): a wider value would be truncated.
        if not -(2**63) <= opts.ignore_index < 2**63:
            raise ValueError(f"ignore_index: must fit in int64 (the targets' type), got {opts.ignore_index}")
        return opts


_TYPES = (float, float, float, float, float, bool, float, int)
