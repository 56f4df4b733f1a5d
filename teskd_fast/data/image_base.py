"""What the ImageFolder backends share: the loader base class, the crop constants, the sampler, the errors.

JPEG headers are read by :mod:`.jpeg`.

The three backends (:mod:`.torchvision_loader`, :mod:`.nvjpeg`, :mod:`.dali`) import this module; the factory
:func:`teskd_fast.data.imagenet_loaders` (:mod:`.imagenet`) imports the backends. Nothing here imports a
backend or the factory, so the imports form no circle.

Every backend shares the folder index (sorted class folders, the scan cache's good files), the epoch order and
sharding of :func:`teskd_fast.data.common.epoch_order`, and the output contract: images [B, 3, S, S]
normalised with the ImageNet mean and std, labels [B] int64, both on the device.
"""

import gc
import math
import os
from collections.abc import Iterator

import torch

from teskd_fast.data.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCAN_HINT,
    BadImageError,
    EpochState,
    check_dtype,
    check_sharding,
    epoch_order,
    normalize_,
    normalize_constants,
)
from teskd_fast.device import resolve_device

# torchvision's RandomResizedCrop defaults: the training crop's area fraction and aspect ratio.
TRAIN_SCALE = (0.08, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_params(height, width, rng, scale=TRAIN_SCALE, ratio=TRAIN_RATIO) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with a numpy generator: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_crops(sizes, rng) -> list[tuple[int, int, int, int, bool]]:
    """Each image's training crop and flip, drawn in order from ``rng``: [(top, left, h, w, flip)].

    ``sizes``: the images' (height, width). The nvjpeg and DALI backends draw a batch's crops with this from
    the generator of (seed, epoch, rank, batch), so their augmentation is a function of those alone.
    """
    return [(*random_resized_crop_params(h, w, rng), bool(rng.random() < 0.5)) for h, w in sizes]


def default_workers(world_size=1) -> int:
    """DataLoader processes per rank: min(8, cores / world_size), at least 1 (DALI threads: ``dali.dali_threads``)."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, world_size)))


class ImageLoaderBase(EpochState):
    """What the three backends share: sizes, sharding, epoch state, the output conversion.

    ``epoch`` / ``position`` / ``state_dict`` / ``load_state_dict`` / ``set_epoch`` behave as on
    :class:`teskd_fast.data.CifarLoader`; ``set_image_size`` changes the training resolution from the next
    pass on (progressive resizing).
    """

    backend = None

    def __init__(self, index, *, train, batch_size, image_size=224, val_resize=256, device=None, rank=0,
                 world_size=1, workers=None, seed=0, drop_last=False, channels_last=False, dtype=torch.float32):
        check_sharding(batch_size, rank, world_size)
        if int(image_size) < 1 or int(val_resize) < int(image_size):
            raise ValueError(f"need 1 <= image_size <= val_resize, got image_size={image_size}, "
                             f"val_resize={val_resize}")
        self.index, self.train, self.batch_size = index, train, batch_size
        self.image_size, self.val_resize = int(image_size), int(val_resize)
        self.device = resolve_device(device)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.drop_last = drop_last and train
        self.workers = default_workers(world_size) if workers is None else int(workers)
        self.channels_last, self.dtype = channels_last, check_dtype(dtype)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        # Made once on the device: building them per batch would copy from the host every batch.
        self._constants = normalize_constants(self.mean, self.std, self.device)
        self._init_state()

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    @property
    def num_images(self) -> int:
        return len(self.index.samples)

    def _fingerprint(self):
        return {**super()._fingerprint(), "backend": self.backend}

    def epoch_indices(self, epoch) -> torch.Tensor:
        """Dataset indices this rank reads in ``epoch``, in order (int64 CPU tensor)."""
        order, positions = epoch_order(self.num_images, shuffle=self.train, seed=self.seed, epoch=epoch,
                                       rank=self.rank, world_size=self.world_size, equal_shards=self.train)
        return order[positions]

    def set_image_size(self, image_size) -> None:
        """Training resolution of the next passes (progressive resizing); evaluation keeps its crop."""
        if int(image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.image_size = int(image_size)

    def _finish(self, images, normalised=False, layout="NCHW"):
        """uint8 or float [B, 3, S, S] ([B, S, S, 3] when layout is NHWC) -> the output contract."""
        images = images.to(self.device, non_blocking=True)
        if layout == "NHWC":
            images = images.permute(0, 3, 1, 2)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if not normalised:
            images = normalize_(images.float(), self.mean, self.std, self._constants)
        return images if images.dtype == self.dtype else images.to(self.dtype)

    def bad_file_error(self, path, reason) -> BadImageError:
        return BadImageError(f"cannot decode {path}: {reason}; {SCAN_HINT.format(root=self.index.root.parent)}")


class ListSampler(torch.utils.data.Sampler):
    """Yields the indices the owner set for the current pass (iterated in the main process)."""

    def __init__(self):
        self.indices = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def workers_iterator(loader: torch.utils.data.DataLoader) -> Iterator:
    """``iter(loader)``, the process's garbage collected first when that forks worker processes.

    A forked worker inherits every object of this process, garbage in reference cycles too, and may collect it
    itself: an earlier loader's DALI pipeline collected there waits in its ``__del__`` for threads the child does
    not have, and the worker hangs (seen in the test suite, the order of collections being a matter of chance).
    """
    if loader.num_workers > 0:
        gc.collect()
    return iter(loader)


def unwrap_worker_error(e) -> BadImageError:
    """A BadImageError re-raised by a DataLoader worker carries the worker traceback; keep our message only."""
    text = str(e)
    marker = "BadImageError: "
    return BadImageError(text[text.rfind(marker) + len(marker) :].strip() if marker in text else text)
