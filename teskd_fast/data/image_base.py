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
# Training augmentations: "rrc" random-resized crop (ImageNet's), "pad-crop" the image resized to the training size,
# zero-padded by an eighth of it and cropped back at a random place, then flipped (CIFAR's, for small images).
AUGMENTS = ("rrc", "pad-crop")


def pad_of(image_size) -> int:
    """The zero padding of the pad-crop augmentation: an eighth of the side (CIFAR's 4 pixels at 32)."""
    return max(1, int(image_size) // 8)


def pad_crops(n, image_size, rng) -> list[tuple[int, int, bool]]:
    """``n`` pad-crop draws from ``rng``: [(dy, dx, flip)] with offsets in 0..2 pad into the padded image."""
    p = pad_of(image_size)
    return [(int(rng.integers(0, 2 * p + 1)), int(rng.integers(0, 2 * p + 1)), bool(rng.random() < 0.5))
            for _ in range(n)]


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


def train_crops(sizes, rng, scale=TRAIN_SCALE) -> list[tuple[int, int, int, int, bool]]:
    """Each image's training crop and flip, drawn in order from ``rng``: [(top, left, h, w, flip)].

    ``sizes``: the images' (height, width); ``scale``: the crop's area fraction range. The nvjpeg and DALI
    backends draw a batch's crops with this from the generator of (seed, epoch, rank, batch), so their
    augmentation is a function of those alone.
    """
    return [(*random_resized_crop_params(h, w, rng, scale), bool(rng.random() < 0.5)) for h, w in sizes]


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
                 world_size=1, workers=None, seed=0, drop_last=False, channels_last=False, dtype=torch.float32,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_scale=TRAIN_SCALE, augment="rrc"):
        check_sharding(batch_size, rank, world_size)
        check_folder_options(mean, std, crop_scale, augment)
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
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.crop_scale, self.augment = tuple(map(float, crop_scale)), augment
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


def check_folder_options(mean, std, crop_scale, augment) -> None:
    """ValueError naming the option unless mean and std are 3 values (std > 0), crop_scale 0 < a <= b <= 1 and
    augment one of :data:`AUGMENTS`."""
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise ValueError(f"mean and std: 3 values each (R, G, B, in [0, 1] units), std > 0; got {tuple(mean)}, "
                         f"{tuple(std)}")
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale: two area fractions 0 < min <= max <= 1, got {tuple(crop_scale)}")
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")


def folder_statistics(index, max_images=1000, seed=0, side=64) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of the RGB pixels of up to ``max_images`` images of ``index``.

    The images (a seeded sample when there are more) are read with Pillow, converted to RGB and resized to
    ``side`` x ``side``, so that every image weighs the same; a file that cannot be read is a BadImageError
    naming it.
    """
    import numpy as np
    from PIL import Image

    from teskd_fast.data.folder import open_regular

    n = len(index.samples)
    chosen = np.random.default_rng(seed).permutation(n)[:max_images] if n > max_images else range(n)
    total = np.zeros(3)
    squares = np.zeros(3)
    for i in chosen:
        path = index.path(int(i))
        try:
            with open_regular(path) as f, Image.open(f) as img:
                pixels = np.asarray(img.convert("RGB").resize((side, side), Image.BILINEAR), np.float64) / 255.0
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImageError(f"cannot decode {path}: {type(e).__name__}: {e}; "
                                f"{SCAN_HINT.format(root=index.root.parent)}") from None
        total += pixels.reshape(-1, 3).sum(0)
        squares += (pixels.reshape(-1, 3) ** 2).sum(0)
    count = len(chosen) * side * side
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


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
