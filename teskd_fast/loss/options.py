"""``LossOptions``, the loss's scalar options: defined (and checked) beside the kernels, in
``teskd_fast.kernels.options``, the lowest layer; re-exported here for the loss API and its users."""

from teskd_fast.kernels.options import LossOptions

__all__ = ["LossOptions"]
