"""The hand-written kernels of teskd_fast, installed as ``teskd_fast.kernels``.

- ``teskd_loss``: the fused Triton kernels of the TESKD loss (forward and backward), their launchers and custom ops;
- ``teskd_loss_cpu`` and ``csrc/``: the fused C kernel of the loss for the CPU, built at first use, ctypes.

Importing ``teskd_loss`` imports Triton; ``teskd_fast`` itself only does so when the triton backend runs.
"""
