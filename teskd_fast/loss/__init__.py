"""The TESKD loss: where the math lives.

- :mod:`.api`: ``teskd_loss`` and ``TESKDLoss`` (validation, dispatch to a backend);
- :mod:`.options`: ``LossOptions``, the one record of the loss's scalar options;
- :mod:`.reference`: the plain PyTorch composition (autograd; the oracle and the baseline);
- :mod:`.closed_form`: the closed-form gradients in two autograd Functions, the fused C kernel's and the batched
  ops' (the torch backend);
- :mod:`.mixed`: ``teskd_loss_mixed``, the loss on mixed targets (CutMix): one backend call and an exact CE
  correction.

The hand-written kernels are in the top-level ``kernels/`` folder, installed as ``teskd_fast.kernels``: the
Triton kernels (``teskd_loss``) and the fused C kernel for the CPU (``teskd_loss_cpu`` and its ``csrc/``).
"""

from .api import BACKENDS, TESKDLoss, teskd_loss
from .options import LossOptions
from .reference import teskd_loss_reference

__all__ = ["BACKENDS", "LossOptions", "TESKDLoss", "teskd_loss", "teskd_loss_reference"]
