"""The hand-written kernels of teskd_fast, installed as ``teskd_fast.kernels``: the lowest layer, importing nothing
from ``teskd_fast`` above it.

- ``options``: ``LossOptions``, the loss's scalar options and their check (re-exported by ``teskd_fast.loss``);
- ``teskd_loss_jit``: the fused Triton kernels of the TESKD loss (forward and backward) and their tile sizes;
- ``teskd_loss``: their launchers, custom ops and autograd wrappers;
- ``teskd_loss_cpu`` and ``csrc/``: the fused C kernel of the loss for the CPU, built at first use, ctypes.

Importing ``teskd_loss`` imports Triton; ``teskd_fast`` itself only does so when the triton backend runs.
"""
