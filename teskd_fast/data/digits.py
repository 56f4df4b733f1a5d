"""The built-in demo data: scikit-learn's bundled handwritten digits (real images, nothing to download).

1797 greyscale 8x8 images of the digits 0-9, split once and for all (stratified, fixed seed) into 1437
training and 360 test images, optionally upsampled to ``image_size`` (8 by default), repeated to 3 channels and
normalised with the training split's mean and std. The whole split lives on the device; augmentation
(random shift by up to ``pad`` pixels with zero fill, the digits' analogue of CIFAR's padded random crop,
no flip) runs there in batches.

The loader keeps the CIFAR loader's contract (:class:`teskd_fast.data.common.EpochState`): ``len()``,
iteration yields ``(images, labels)`` on the device, ``set_epoch(epoch, start_batch=k)`` chooses the epoch's
seeded order and makes the next pass start at batch ``k`` with exactly the images and augmentations an
uninterrupted epoch would have given there, ``state_dict()`` / ``load_state_dict()`` record the position.
Sharding differs from CIFAR's in one way, on purpose: ``rank`` / ``world_size`` split every GLOBAL batch
(``batch_size * world_size`` images) into contiguous slices, so that N processes see, step for step,
exactly the images one process with the global batch would see.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from teskd_fast.data.common import AUGMENT_STREAM, EpochState, torch_generator

NUM_CLASSES = 10
# The class names, in label order.
CLASSES = tuple(str(d) for d in range(NUM_CLASSES))
TRAIN_SIZE = 1437
TEST_SIZE = 360
_SPLIT_SEED = 0


def load_digits_split(image_size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed train/test split of scikit-learn's digits, as float images in [0, 1].

    Args:
        image_size: side of the returned images (bilinear upsampling of the 8x8 originals).

    Shapes:
        train images ``[1437, 1, S, S]`` float32, train labels ``[1437]`` int64; test likewise with 360.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)`` on the CPU.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("the digits demo needs scikit-learn: pip install scikit-learn") from e
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8]
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=TEST_SIZE, stratify=digits.target, random_state=_SPLIT_SEED
    )
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class DigitsLoader(EpochState):
    """Batches of on-device digits images; seeded, shardable, resumable inside an epoch.

    Args:
        images: ``[N, 1, S, S]`` float images in [0, 1] (any device; moved to ``device``).
        labels: ``[N]`` int64 class indices.
        batch_size: images per step on THIS process (the global batch is ``batch_size * world_size``).
        device: where batches are produced.
        mean, std: normalisation constants (scalars, the greyscale statistics).
        shuffle: a new seeded order every epoch (training) or the stored order (evaluation).
        augment: random shift by up to ``pad`` pixels, zero filled.
        seed: seed of the order and the augmentation; the same seed gives the same batches.
        rank, world_size: this process's shard: a contiguous slice of every global batch. A last partial
            global batch is split into ``world_size`` near-equal slices; when shuffling (training) it is dropped
            if smaller than ``world_size``, so that no process gets an empty step.
        drop_last: drop the last partial global batch.
        channels_last: return channels_last tensors.
        dtype: dtype of the returned images.

    Shapes:
        yields ``images [b, 3, S, S]`` and ``labels [b]`` with ``b <= batch_size``.
    """

    classes = CLASSES

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        mean: float = 0.0,
        std: float = 1.0,
        shuffle: bool = True,
        augment: bool = True,
        pad: int = 2,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be [N, 1, S, S], got {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must be [{images.shape[0]}], got {tuple(labels.shape)}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.device = torch.device(device)
        self.images = ((images - mean) / std).to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.augment, self.pad, self.seed = shuffle, augment, pad, seed
        self.drop_last, self.channels_last, self.dtype = drop_last, channels_last, dtype
        # The normalised value of a black pixel: what the shift fills in.
        self.fill = (0.0 - mean) / std
        self._init_state()

    def _bounds(self) -> list[tuple[int, int]]:
        """Start and end (into the epoch's order) of this rank's slice of every global batch."""
        n, gb, w = len(self.labels), self.batch_size * self.world_size, self.world_size
        out = []
        for start in range(0, n, gb):
            size = min(gb, n - start)
            # Training never gives a process an empty step; evaluation keeps every image.
            if size < gb and (self.drop_last or (size < w and self.shuffle)):
                break
            # Near-equal contiguous slices: the first (size % w) ranks get one more image.
            per, extra = divmod(size, w)
            lo = start + self.rank * per + min(self.rank, extra)
            hi = lo + per + (1 if self.rank < extra else 0)
            if hi > lo:
                out.append((lo, hi))
        return out

    def __len__(self) -> int:
        return len(self._bounds())

    @property
    def num_images(self) -> int:
        return len(self.labels)

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(n)
        g = torch_generator(self.seed, epoch)
        return torch.randperm(n, generator=g)

    def _shift(self, x: torch.Tensor, epoch: int, batch: int, lo: int, hi: int, start: int) -> torch.Tensor:
        # The offsets are drawn for the whole global batch, then sliced, so that sharding does not change
        # which image gets which shift.
        g = torch_generator(self.seed, epoch, batch, AUGMENT_STREAM)
        gb = self.batch_size * self.world_size
        offsets = torch.randint(0, 2 * self.pad + 1, (gb, 2), generator=g)[lo - start : hi - start]
        offsets = offsets.to(self.device)
        b, c, s, _ = x.shape
        padded = F.pad(x, (self.pad,) * 4, value=self.fill)
        ar = torch.arange(s, device=self.device)
        rows = ar[None, :] + offsets[:, 0:1]  # [b, S]
        cols = ar[None, :] + offsets[:, 1:2]  # [b, S]
        bi = torch.arange(b, device=self.device)[:, None, None]
        # [b, S, S, C] -> [b, C, S, S]
        return padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, first = self._begin_pass()
        order = self._order(epoch).to(self.device)
        bounds = self._bounds()
        gb = self.batch_size * self.world_size
        for batch in range(first, len(bounds)):
            lo, hi = bounds[batch]
            idx = order[lo:hi]
            x = self.images[idx]
            if self.augment and self.pad > 0:
                x = self._shift(x, epoch, batch, lo, hi, batch * gb)
            x = x.expand(-1, 3, -1, -1).to(self.dtype)
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
            self.position = batch + 1
            yield x, self.labels[idx]
        self._end_pass(epoch)


def digits_loaders(
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    seed: int = 27,
    rank: int = 0,
    world_size: int = 1,
    image_size: int = 8,
    augment: bool = True,
    val_batch_size: int | None = None,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[DigitsLoader, DigitsLoader]:
    """Training and test loaders over scikit-learn's digits, the same contract as ``cifar_loaders``.

    Args:
        batch_size: images per step per process (the caller divides a global batch by ``world_size``).
        device: where the data lives and batches are produced.
        seed: seed of the training order and augmentation (the split itself is fixed).
        rank, world_size: this process's shard of every batch (training and test).
        image_size: side of the images (8, or upsampled from 8).
        augment: random shifts of up to ``image_size // 8`` pixels (at least 1) on the training split.
        val_batch_size: test batch per process (default: ``2 * batch_size``).
        channels_last, dtype: memory format and dtype of the images.

    Returns:
        ``(train, test)``: :class:`DigitsLoader` objects yielding ``([b, 3, S, S] images, [b] labels)``.
    """
    xtr, ytr, xte, yte = load_digits_split(image_size)
    mean, std = float(xtr.mean()), float(xtr.std())
    common = dict(device=device, mean=mean, std=std, rank=rank, world_size=world_size,
                  channels_last=channels_last, dtype=dtype)
    # A shift of 1 pixel at 8x8, 2 at 16x16: the digits' analogue of CIFAR's 4 pixels at 32x32.
    pad = max(1, image_size // 8)
    train = DigitsLoader(xtr, ytr, batch_size, shuffle=True, augment=augment, pad=pad, seed=seed, **common)
    val = DigitsLoader(xte, yte, val_batch_size or 2 * batch_size, shuffle=False, augment=False, seed=seed,
                       **common)
    return train, val
