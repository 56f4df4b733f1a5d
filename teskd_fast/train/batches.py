"""The training loop's batches: which steps an epoch takes, what a compiled run does with a partial batch, and
which resumes keep the epoch's sums exact.

- A training step needs at least 2 images per process: BatchNorm normalises a training batch by its own
  statistics, which one image cannot give (at a 1x1 feature map PyTorch refuses it outright). ``--batch-size``
  below 2 per process is refused before any work; a last batch of one image (1437 digits in batches of 718 is
  718 + 718 + 1) is left out of the epoch: the epoch takes one step fewer, on every process. The order is drawn
  afresh each epoch, so the image left out differs from epoch to epoch. Evaluation keeps every image.
- A compiled run compiles one graph per mode (train and eval) at the full per-process batch. A batch of another
  size (the epoch's last partial batch, the last evaluation batch) runs the same module eagerly, under Dynamo's
  ``force_eager`` stance, instead of compiling a graph per size: the same computation as the uncompiled
  network, for a few images per epoch.
- The sums of a mid-epoch checkpoint are over the saved run's processes; a resume inside that epoch with
  another number of processes is refused (the data shards of the rest of the epoch differ too).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from teskd_fast.train import distributed as D
from teskd_fast.train.config import ConfigError, TrainConfig


def check_batches(cfg: TrainConfig, env: D.DistEnv, resume: dict[str, Any] | None) -> None:
    """Refuse, before any work, a batch that does not split over the processes or gives a process fewer than 2
    images, and a mid-epoch resume with another number of processes (:class:`ConfigError`, exit status 2)."""
    w = env.world_size
    if cfg.batch_size % w:
        raise ConfigError(f"--batch-size {cfg.batch_size} (global) is not divisible by the {w} processes")
    if cfg.batch_size // w < 2 and not cfg.eval_only:
        over = f" over {w} processes gives {cfg.batch_size // w} image per process" if w > 1 else ""
        raise ConfigError(f"--batch-size {cfg.batch_size}{over}: a training step needs at least 2 images per "
                          "process (BatchNorm normalises a batch by its own statistics); use "
                          f"--batch-size {2 * w} or more")
    sums = resume.get("accumulator") if resume and resume.get("position") else None
    saved = sums.get("world_size") if isinstance(sums, dict) else None  # None: saved between epochs
    if saved is not None and saved != w:
        raise ConfigError(
            f"last.pt was saved inside epoch {resume['epoch'] + 1} (batch {resume['position']}) by {saved} "
            f"process(es); this resume has {w}. The epoch's running sums and the data shards of its remaining "
            f"batches belong to {saved} processes: resume it with {saved} (torchrun --nproc_per_node {saved}); "
            "the number of processes may change at an epoch's end (a checkpoint saved between epochs)")


def last_batch_size(loader: Any) -> int | None:
    """Images in this process's last training batch of an epoch, from the loader's sizes (no batch is made);
    None for a loader that does not say."""
    from teskd_fast.data.digits import DigitsLoader

    if isinstance(loader, DigitsLoader):
        bounds = loader._bounds()
        return bounds[-1][1] - bounds[-1][0] if bounds else None
    try:
        n, b, drop = loader.num_samples, loader.batch_size, loader.drop_last
    except AttributeError:
        return None
    return b if drop or n % b == 0 else n % b


def train_steps(loader: Any, cfg: TrainConfig, env: D.DistEnv) -> int:
    """The steps of a training epoch: the loader's batches less a last batch of one image on any process, at
    most ``--steps-per-epoch``. Every process calls it together (one all-reduce)."""
    n = len(loader)
    last = last_batch_size(loader)
    smallest = D.all_reduce(torch.tensor([last or 2], device=env.device), env, "min")
    if n and int(smallest.item()) < 2:
        n -= 1
    return min(n, cfg.steps_per_epoch) if cfg.steps_per_epoch else n


class EagerTails(nn.Module):
    """Runs a compiled forward on full batches and a batch of any other size eagerly.

    The full batch is the training loader's in ``train()`` mode and the evaluation loader's in ``eval()`` mode
    (their ``batch_size``; for a loader without one, the first batch seen in that mode). Dynamo's ``force_eager``
    stance runs the compiled module's original forward, so that a partial batch neither compiles a graph of its
    own nor makes the full batches' graph dynamic. DDP around the compiled module is untouched: its hooks see the
    same parameters either way.

    Args:
        module: the compiled module (or DDP around it).
        train_loader, eval_loader: the loaders whose batches it runs.
    """

    def __init__(self, module: nn.Module, train_loader: Any, eval_loader: Any):
        super().__init__()
        self.module = module
        self.full = {True: getattr(train_loader, "batch_size", None), False: getattr(eval_loader, "batch_size", None)}

    def forward(self, images: torch.Tensor) -> Any:
        if self.full[self.training] is None:
            self.full[self.training] = images.shape[0]
        if images.shape[0] == self.full[self.training]:
            return self.module(images)
        with torch.compiler.set_stance("force_eager"):
            return self.module(images)
