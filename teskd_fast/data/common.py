"""Pieces shared by every loader: normalisation constants, errors, device and dtype checks, epoch order.

Every loader of this package draws its per-epoch randomness (order, augmentation) on the CPU from generators
seeded by :func:`seed_sequence` over ``(seed, epoch, ...)``, so an epoch's batches depend only on the seed and
the epoch: the same on every rank, on the CPU and on a GPU, and after a resume.
"""

from typing import Any

import numpy as np
import torch

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCAN_HINT = "run `teskd-scan {root}` to find every unreadable file and write the list of good files the loaders use"


class DatasetError(Exception):
    """The dataset on disk cannot be used as it is; the message names the path and says what to do.

    Every failure that comes from the data (not from an argument) is one of its three kinds below; the
    training command turns any of them into its message and exit status 1.
    """


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """Missing: a dataset root, archive, file, split folder, class folder or class folder without images."""


class CorruptDatasetError(DatasetError, ValueError):
    """Present but wrong: a file or scan cache whose content is not what the dataset layout says."""


class BadImageError(DatasetError, RuntimeError):
    """An image file cannot be decoded; the message names the file and says to run ``teskd-scan``."""


def check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}.get(dtype, dtype)
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in OUTPUT_DTYPES]}, got {dtype!r}")
    return dtype


def check_sharding(batch_size, rank, world_size) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")


# Streams: the last key of a seed that is not the epoch order (which uses (seed, epoch) alone).
AUGMENT_STREAM = 1
DALI_STREAM = 2
# The trainer's batch mixing (CutMix): keys (seed, epoch, rank, batch, MIX_STREAM).
MIX_STREAM = 3


def seed_sequence(*keys) -> np.random.SeedSequence:
    """The package's one seeding scheme: numpy's ``SeedSequence`` over integer keys, e.g. ``(seed, epoch)``.

    Distinct key tuples give statistically independent streams (SeedSequence hashes them), whatever their size.
    Keys are taken modulo 2**64, so a negative seed works too.
    """
    return np.random.SeedSequence([int(k) % 2**64 for k in keys])


def derive_seed(*keys) -> int:
    """A 63-bit integer seed derived from ``keys`` (for ``torch.Generator.manual_seed`` or a DALI pipeline)."""
    return int(seed_sequence(*keys).generate_state(1, np.uint64)[0] >> 1)


def torch_generator(*keys) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``keys``: a pure function of them."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def numpy_generator(*keys) -> np.random.Generator:
    """A numpy ``Generator`` (PCG64) seeded from ``keys``: a pure function of them."""
    return np.random.default_rng(seed_sequence(*keys))


def shard_bounds(n, rank, world_size) -> tuple[int, int]:
    """Contiguous shard ``[start, stop)`` of ``n`` items for ``rank``: DALI's readers split the same way."""
    return n * rank // world_size, n * (rank + 1) // world_size


def epoch_order(n, *, shuffle, seed, epoch, rank=0, world_size=1,
                equal_shards=False) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices this rank reads in one epoch, and the positions they hold in the global epoch order.

    Args:
        n: dataset size.
        shuffle: permute with the epoch's generator; otherwise dataset order.
        equal_shards: truncate the epoch to a multiple of ``world_size`` (fewer than ``world_size`` samples,
            a different few each epoch when shuffled), so every rank gets the same number of samples: needed
            for training under DDP. Without it, shards differ in size by at most one and cover the dataset.

    Returns:
        (order, positions): int64 CPU tensors; ``order`` is the full (possibly truncated) global order and
        ``positions`` the slice of it that belongs to ``rank`` (shards are disjoint).
    """
    order = torch.randperm(n, generator=torch_generator(seed, epoch)) if shuffle else torch.arange(n)
    if equal_shards:
        order = order[: (n // world_size) * world_size]
    start, stop = shard_bounds(len(order), rank, world_size)
    return order, torch.arange(start, stop)


def num_batches(n, batch_size, drop_last) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def normalize_constants(mean, std, device, dtype=torch.float32, dim=4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, bias)`` with ``x * scale + bias == (x / 255 - mean) / std``, shaped to broadcast on channel dim 1."""
    shape = (1, -1) + (1,) * (dim - 2)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device, dtype=dtype).view(shape)
    bias = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device, dtype=dtype).view(shape)
    return scale, bias


def normalize_(images, mean, std, constants=None) -> torch.Tensor:
    """In place: ``images`` float in [0, 255] -> ``(images / 255 - mean) / std``, channel dim 1. Returns it.

    ``constants``: :func:`normalize_constants` made once, for a caller that normalises many batches.
    """
    scale, bias = constants or normalize_constants(mean, std, images.device, images.dtype, images.dim())
    return images.mul_(scale).add_(bias)


class EpochState:
    """Epoch and position bookkeeping shared by the loaders (see ``state_dict`` of each loader).

    ``epoch`` advances by one after a complete pass. ``position`` is the number of batches of the current
    epoch handed out so far; a pass started after ``load_state_dict`` or ``set_epoch(e, start_batch=k)``
    begins at that batch, any other pass at batch 0.
    """

    def _init_state(self):
        self.epoch = 0
        self.position = 0
        self._start_batch = 0

    def set_epoch(self, epoch, start_batch=0) -> None:
        """Select the epoch of the next pass (its order and augmentation), starting at batch ``start_batch``."""
        if int(epoch) < 0 or int(start_batch) < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got {epoch}, {start_batch}")
        self.epoch, self._start_batch, self.position = int(epoch), int(start_batch), int(start_batch)

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", ...}``: where the loader stands; restore it with ``load_state_dict``."""
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state) -> None:
        """Resume: the next pass yields exactly the batches the saved loader had not yet handed out."""
        mine = self._fingerprint()
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise ValueError(f"loader state was saved with {key}={state[key]!r}, this loader has {value!r}")
        self.set_epoch(state["epoch"], state.get("position", 0))

    def _fingerprint(self):
        """What a saved state must agree on to be loaded here (see ``load_state_dict``)."""
        return {"batch_size": self.batch_size, "seed": self.seed, "world_size": self.world_size, "rank": self.rank,
                "num_images": self.num_images}

    @property
    def num_samples(self) -> int:
        """Samples this rank reads per epoch (training shards are equal in size, evaluation shards cover all)."""
        _, positions = epoch_order(self.num_images, shuffle=False, seed=0, epoch=0, rank=self.rank,
                                   world_size=self.world_size, equal_shards=self.train)
        return len(positions)

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def _begin_pass(self):
        start = self._start_batch
        self._start_batch = 0
        self.position = start
        return self.epoch, start

    def _end_pass(self, epoch):
        self.epoch, self.position = epoch + 1, 0
