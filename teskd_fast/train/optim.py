"""The optimisers of ``--opt`` and the optimiser step: gradient accumulation, gradient clipping, loss scaling.

- ``sgd``: PyTorch's fused SGD with (Nesterov) momentum (:func:`teskd_fast.train.build.sgd`).
- ``adamw``: ``torch.optim.AdamW`` (decoupled weight decay, Loshchilov & Hutter 2019), fused on CUDA, with
  ``--betas`` and ``--eps``. As timm's ``create_optimizer_v2`` does, norm weights, biases and every other 1-D
  parameter go without weight decay by default (``--bn-weight-decay`` puts them back; see
  :func:`teskd_fast.train.build.param_groups`).

One optimiser step (:func:`optimizer_step`) follows ``--accum-steps`` micro-batches whose losses are each divided
by ``accum_steps`` (:class:`Accumulation`), so that the summed gradient is the gradient of the mean loss over the
large batch (the feature term, a sum over the batch, is weighted ``accum_steps`` times more instead). Under fp16 the
grad scaler's gradients are unscaled before ``--clip-grad`` clips their global norm, and a step with an inf or
NaN gradient is skipped as the scaler always skips it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def adamw(params: Any, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
          device: torch.device) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (parameters or groups), fused on CUDA (a grad scaler's ``found_inf``
    then stays on the device), PyTorch's default implementation elsewhere.

    Loading a ``state_dict`` keeps the implementation of this device (a checkpoint from another device brings its
    own ``fused`` flag)."""
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                  fused=fused or None)

    def keep_implementation(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            group["fused"] = fused or None
            group["foreach"] = None

    optimizer.register_load_state_dict_post_hook(keep_implementation)
    return optimizer


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   params: list[nn.Parameter], clip_grad: float = 0.0) -> None:
    """Take the step of the gradients in ``params``' ``.grad``, clipping their global norm to ``clip_grad`` first
    (0: no clipping), then zero them (``set_to_none``).

    With a grad scaler the gradients are scaled: they are unscaled (``scaler.unscale_``) before clipping, so the
    norm clipped is the true gradient's; the scaler then skips a step whose gradients hold an inf or NaN and
    updates its scale. Nothing here reads a value on the host.
    """
    if scaler is not None:
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
        scaler.step(optimizer)
        scaler.update()
    else:
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Accumulation:
    """Where a run is inside its accumulation of ``steps`` micro-batches per optimiser step.

    Micro-batch ``i`` of an epoch (0-based) belongs to optimiser step ``i // steps`` of the epoch, and that step is
    taken after micro-batch ``i`` when ``(i + 1) % steps == 0``. An epoch takes ``batches // steps`` optimiser
    steps; the last ``batches % steps`` batches are left out (the large batch's ``drop_last``), so that every step
    has the same number of micro-batches.
    """

    def __init__(self, steps: int):
        self.steps = int(steps)
        self.scale = 1.0 / self.steps

    def micro_batches(self, batches: int) -> int:
        """The micro-batches an epoch of ``batches`` loader batches takes."""
        return batches - batches % self.steps

    def updates(self, batches: int) -> int:
        """The optimiser steps of an epoch of ``batches`` loader batches."""
        return batches // self.steps

    def is_step(self, i: int) -> bool:
        """Whether the optimiser steps after micro-batch ``i`` of the epoch."""
        return (i + 1) % self.steps == 0

    def pending(self, position: int) -> bool:
        """Whether gradients are accumulated, not yet stepped, at ``position`` micro-batches into an epoch."""
        return position % self.steps != 0


def grads_state(params: list[nn.Parameter]) -> list[torch.Tensor | None]:
    """The accumulated ``.grad`` of each parameter (None where there is none), for a checkpoint taken in the middle
    of an accumulation: plain tensors in a list, loadable with ``torch.load(weights_only=True)``."""
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def load_grads_state(params: list[nn.Parameter], grads: list[torch.Tensor | None]) -> None:
    """Put back what :func:`grads_state` saved (each on its parameter's device, dtype and layout)."""
    if len(grads) != len(params):
        raise ValueError(f"the checkpoint's accumulated gradients are for {len(grads)} parameters; the model has "
                         f"{len(params)}")
    for p, g in zip(params, grads, strict=True):
        if g is None:
            p.grad = None
        else:
            p.grad = torch.empty_like(p)
            p.grad.copy_(g)
