"""ImageNet-style loaders (ROOT/train/<class>/*.JPEG, ROOT/val/<class>/*.JPEG) with three backends.

- ``dali``: NVIDIA DALI, GPU JPEG decoding (``device="mixed"``) with a fused random-resized-crop decode on
  CUDA; DALI's CPU-only mode (``device_id=None``) on a machine without a GPU. See :mod:`.dali`.
- ``nvjpeg``: CPU workers read file bytes, ``torchvision.io.decode_jpeg(device="cuda")`` decodes a batch on
  the GPU, augmentation runs on the GPU. See :mod:`.nvjpeg`.
- ``torchvision``: ImageFolder + DataLoader with workers and pinned memory (the familiar baseline).

All three share the folder index (sorted class folders, the scan cache's good files), the epoch order and
sharding of :func:`teskd_fast.data.common.epoch_order`, and the output contract: images
[B, 3, S, S] normalised with the ImageNet mean and std, labels [B] int64, both on the device.
"""

import os
from functools import partial
from pathlib import Path

import torch
from torchvision import datasets

from teskd_fast.data.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCAN_HINT,
    BadImageError,
    DatasetNotFoundError,
    EpochState,
    check_dtype,
    check_sharding,
    epoch_order,
    normalize_,
    resolve_device,
)
from teskd_fast.data.folder import index_image_folder

BACKENDS = ("dali", "nvjpeg", "torchvision")
TRAIN_SCALE = (0.08, 1.0)
TRAIN_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def dali_available():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend(device):
    """DALI where installed; else nvjpeg on CUDA; else torchvision."""
    if dali_available():
        return "dali"
    return "nvjpeg" if device.type == "cuda" else "torchvision"


def default_workers(world_size=1):
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
        self._init_state()

    @property
    def classes(self):
        return self.index.classes

    @property
    def num_images(self):
        return len(self.index.samples)

    def _fingerprint(self):
        return {"batch_size": self.batch_size, "seed": self.seed, "world_size": self.world_size, "rank": self.rank,
                "num_images": self.num_images, "backend": self.backend}

    def epoch_indices(self, epoch):
        """Dataset indices this rank reads in ``epoch``, in order (int64 CPU tensor)."""
        order, positions = epoch_order(self.num_images, shuffle=self.train, seed=self.seed, epoch=epoch,
                                       rank=self.rank, world_size=self.world_size, equal_shards=self.train)
        return order[positions]

    def set_image_size(self, image_size):
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
            images = normalize_(images.float(), self.mean, self.std)
        return images if images.dtype == self.dtype else images.to(self.dtype)

    def bad_file_error(self, path, reason):
        return BadImageError(f"cannot decode {path}: {reason}; {SCAN_HINT.format(root=self.index.root.parent)}")


def _pil_loader(path, root):
    from PIL import Image

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    # Pillow reports a broken file as OSError (truncated, unknown format), SyntaxError or ValueError.
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"cannot decode {path}: {type(e).__name__}: {e}; {SCAN_HINT.format(root=root)}") from e


class _ListSampler(torch.utils.data.Sampler):
    """Yields the indices the owner set for the current pass (iterated in the main process)."""

    def __init__(self):
        self.indices = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def unwrap_worker_error(e):
    """A BadImageError re-raised by a DataLoader worker carries the worker traceback; keep our message only."""
    text = str(e)
    marker = "BadImageError: "
    return BadImageError(text[text.rfind(marker) + len(marker) :].strip() if marker in text else text)


class _IndexedImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder whose samples come from the shared index (scan cache included), not a walk."""

    def __init__(self, index, **kwargs):
        self._index = index
        super().__init__(str(index.root), **kwargs)

    def make_dataset(self, directory, class_to_idx, *args, **kwargs):
        return [(self._index.path(i), label) for i, (_, label) in enumerate(self._index.samples)]


class TorchvisionImageLoader(ImageLoaderBase):
    """ImageFolder + DataLoader: Pillow decodes in ``workers`` processes, uint8 batches travel in pinned memory.

    Training: RandomResizedCrop(image_size, scale 0.08-1, ratio 3/4-4/3) + RandomHorizontalFlip; evaluation:
    Resize(val_resize) + CenterCrop(image_size). Normalisation runs on the device after the copy.
    Resuming mid-epoch gives the same remaining images; their random crops are drawn afresh.
    """

    backend = "torchvision"

    def __init__(self, index, **kwargs):
        super().__init__(index, **kwargs)
        self._sampler = _ListSampler()
        self._loader = None
        self._loader_size = None

    def _make_dataset(self):
        from torchvision import transforms

        if self.train:
            tf = [transforms.RandomResizedCrop(self.image_size, scale=TRAIN_SCALE, ratio=TRAIN_RATIO),
                  transforms.RandomHorizontalFlip()]
        else:
            tf = [transforms.Resize(self.val_resize), transforms.CenterCrop(self.image_size)]
        index = self.index
        dataset = _IndexedImageFolder(index, transform=transforms.Compose(tf + [transforms.PILToTensor()]),
                                      loader=partial(_pil_loader, root=index.root.parent))
        if dataset.classes != index.classes:
            raise RuntimeError(f"ImageFolder found other classes in {index.root} than the index; rebuild the loader")
        return dataset

    def _make_loader(self):
        workers = self.workers
        self._loader = torch.utils.data.DataLoader(
            self._make_dataset(), batch_size=self.batch_size, sampler=self._sampler, num_workers=workers,
            pin_memory=self.device.type == "cuda", drop_last=self.drop_last, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        self._loader_size = self.image_size

    def __iter__(self):
        epoch, start = self._begin_pass()
        if self._loader is None or self._loader_size != self.image_size:
            self._loader = None
            self._make_loader()
        self._sampler.indices = self.epoch_indices(epoch)[start * self.batch_size :].tolist()
        k = start
        it = iter(self._loader)
        while True:
            try:
                images, labels = next(it)
            except StopIteration:
                break
            except BadImageError as e:
                raise unwrap_worker_error(e) from None
            k += 1
            self.position = k
            yield self._finish(images), labels.to(self.device, non_blocking=True)
        self._end_pass(epoch)


def make_image_loader(backend, index, **kwargs):
    if backend == "torchvision":
        return TorchvisionImageLoader(index, **kwargs)
    if backend == "dali":
        from teskd_fast.data.dali import DaliImageLoader

        return DaliImageLoader(index, **kwargs)
    if backend == "nvjpeg":
        from teskd_fast.data.nvjpeg import NvjpegImageLoader

        return NvjpegImageLoader(index, **kwargs)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def imagenet_loaders(root, batch_size=256, backend=None, image_size=224, val_resize=256, device=None, rank=0,
                     world_size=1, workers=None, *, seed=0, drop_last=False, channels_last=False,
                     dtype=torch.float32, eval_batch_size=None, val_image_size=None, scan_cache=None,
                     use_scan=True, train_dir="train", val_dir="val"):
    """Training and validation loaders over an ImageFolder tree (ImageNet layout).

    Args:
        root: folder holding ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``.
        batch_size: training batch per rank (evaluation: ``eval_batch_size``, default the same).
        backend: "dali", "nvjpeg" or "torchvision"; None: DALI where installed, else nvjpeg on CUDA, else
            torchvision.
        image_size: training crop (change it between epochs with ``train.set_image_size``).
        val_resize, val_image_size: evaluation resizes the shorter side to ``val_resize`` then centre-crops
            ``val_image_size`` (default ``image_size``).
        device: where batches are delivered (None: CUDA when available). DALI and nvjpeg decode on it.
        rank, world_size: DDP sharding; training shards are disjoint and equal, evaluation shards disjoint and
            complete.
        workers: DALI threads / DataLoader processes (default: min(8, cores / world_size)).
        seed: seeds each epoch's order (and DALI's / nvjpeg's augmentation).
        drop_last: drop the incomplete last training batch.
        channels_last, dtype: memory format and float32 / bfloat16 / float16 output.
        scan_cache: cache written by ``teskd-scan`` (default: ``teskd_scan.json`` in ROOT or the split folder,
            used when present); use_scan=False ignores it.

    Shapes:
        each loader yields images [B, 3, S, S] normalised with the ImageNet mean and std, and labels [B] int64.

    Returns:
        (train, val) loaders with len(), ``classes``, ``set_epoch``, ``set_image_size``, ``state_dict``.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"ImageNet root {root} not found: expected {root}/{train_dir}/<class>/*.JPEG and "
            f"{root}/{val_dir}/<class>/*.JPEG (ILSVRC2012 train and val, the val images sorted into class folders)"
        )
    device = resolve_device(device)
    backend = default_backend(device) if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nvjpeg" and device.type != "cuda":
        raise RuntimeError("backend='nvjpeg' decodes JPEGs on the GPU with torchvision.io.decode_jpeg(device='cuda') "
                           f"and needs a CUDA device (got device={str(device)!r}); use backend='dali' (CPU mode) or "
                           "backend='torchvision' here")
    if backend == "dali" and not dali_available():
        raise ImportError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or the build for "
                          "your CUDA; teskd_fast's extra: pip install 'teskd_fast[dali]'), or use backend='nvjpeg' "
                          "or 'torchvision'")
    train_index = index_image_folder(root / train_dir, scan_cache=scan_cache, use_scan=use_scan)
    val_index = index_image_folder(root / val_dir, scan_cache=scan_cache, use_scan=use_scan)
    if train_index.classes != val_index.classes:
        only = sorted(set(train_index.classes) ^ set(val_index.classes))[:5]
        raise ValueError(f"{root / train_dir} and {root / val_dir} hold different class folders (e.g. {only})")
    common = dict(image_size=image_size, val_resize=val_resize, device=device, rank=rank, world_size=world_size,
                  workers=workers, seed=seed, channels_last=channels_last, dtype=dtype)
    train = make_image_loader(backend, train_index, train=True, batch_size=batch_size, drop_last=drop_last, **common)
    common["image_size"] = val_image_size or image_size
    val = make_image_loader(backend, val_index, train=False, batch_size=eval_batch_size or batch_size, **common)
    return train, val
