"""ImageNet-style loaders (ROOT/train/<class>/*.JPEG, ROOT/val/<class>/*.JPEG) with three backends.

- ``dali``: NVIDIA DALI, GPU JPEG decoding (``device="mixed"``) with a fused random-resized-crop decode on
  CUDA; DALI's CPU-only mode (``device_id=None``) on a machine without a GPU. See :mod:`.dali`.
- ``nvjpeg``: CPU workers read file bytes, ``torchvision.io.decode_jpeg(device="cuda")`` decodes a batch on
  the GPU, augmentation runs on the GPU. See :mod:`.nvjpeg`.
- ``torchvision``: ImageFolder + DataLoader with workers and pinned memory (the familiar baseline). See
  :mod:`.torchvision_loader`.

This module is the factory: it checks the layout and imports the backends (DALI and nvjpeg only when chosen).
What the backends share lives in :mod:`.image_base`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from teskd_fast.data.common import IMAGENET_MEAN, IMAGENET_STD, CorruptDatasetError, DatasetNotFoundError
from teskd_fast.data.folder import FolderIndex, index_image_folder, visible_entries
from teskd_fast.data.image_base import TRAIN_SCALE, ImageLoaderBase, check_folder_options, folder_statistics
from teskd_fast.device import resolve_device


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _backend_option(backend: str) -> str:
    return f"backend={backend!r}"


class LoaderBackend(NamedTuple):
    """One ImageFolder loader backend: where its loader class lives and what it needs to run.

    Attributes:
        module, class_name: the :class:`~teskd_fast.data.image_base.ImageLoaderBase` subclass (imported only
            when the backend is chosen).
        problem: ``problem(device, option)`` says why the backend cannot run on ``device`` here, or None;
            ``option(name)`` spells how the caller chooses a backend (``backend='dali'``, ``--loader dali``).
        error: the exception :func:`imagenet_loaders` raises with that message.
        formats: the Pillow format names it decodes; None: every format Pillow reads (see
            :func:`teskd_fast.data.folder.index_image_folder`, which reads a scan cache with it).
    """

    module: str
    class_name: str
    problem: Callable[[torch.device, Callable[[str], str]], str | None]
    error: type[Exception]
    formats: tuple[str, ...] | None = None


def _nvjpeg_problem(device: torch.device, option: Callable[[str], str]) -> str | None:
    if device.type == "cuda":
        return None
    where = f"got device {str(device)!r}" if torch.cuda.is_available() else "no CUDA device on this machine"
    return (f"{option('nvjpeg')} decodes JPEGs on the GPU with torchvision.io.decode_jpeg(device='cuda') and needs a "
            f"CUDA device ({where}); use {option('torchvision')} (Pillow in worker processes) or {option('dali')} "
            "(DALI's CPU mode) here")


def _dali_problem(device: torch.device, option: Callable[[str], str]) -> str | None:
    if dali_available():
        return None
    return (f"{option('dali')} needs NVIDIA DALI, which is not installed: pip install nvidia-dali-cuda130 (or the "
            "build for your CUDA; teskd_fast's extra: pip install 'teskd_fast[dali]'), or use "
            f"{option('torchvision')}, or {option('nvjpeg')} on CUDA")


# name -> backend; the order is the one --loader lists (after "auto").
LOADER_BACKENDS: dict[str, LoaderBackend] = {
    "dali": LoaderBackend("teskd_fast.data.dali", "DaliImageLoader", _dali_problem, ImportError),
    "nvjpeg": LoaderBackend("teskd_fast.data.nvjpeg", "NvjpegImageLoader", _nvjpeg_problem, RuntimeError,
                            formats=("JPEG",)),
    "torchvision": LoaderBackend("teskd_fast.data.torchvision_loader", "TorchvisionImageLoader",
                                 lambda device, option: None, RuntimeError),
}
BACKENDS = tuple(LOADER_BACKENDS)


def loader_backend(backend: str) -> LoaderBackend:
    """The registry entry of ``backend``; a ValueError names the known ones."""
    if backend not in LOADER_BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return LOADER_BACKENDS[backend]


def backend_problem(backend: str, device: torch.device, option: Callable[[str], str] = _backend_option) -> str | None:
    """Why loader ``backend`` cannot run on ``device`` on this machine, or None when it can.

    Args:
        backend: a name of :data:`LOADER_BACKENDS`.
        device: where the loader would deliver (and, for nvjpeg and DALI, decode) its batches.
        option: how the message names a backend: ``backend='dali'`` by default, ``--loader dali`` for the
            training command.
    """
    return loader_backend(backend).problem(device, option)


def default_backend(device: torch.device) -> str:
    """DALI where installed; else nvjpeg on CUDA; else torchvision."""
    if dali_available():
        return "dali"
    return "nvjpeg" if device.type == "cuda" else "torchvision"


def check_folder_root(root: str | Path, train_dir: str = "train", val_dir: str = "val", splits: bool = True,
                      source: str = "") -> Path:
    """``root`` as a Path, once it is a folder holding (with ``splits``) the two split folders, neither empty.

    Without ``splits`` only the root is checked; the folder index then names a missing split or class folder.
    Hidden entries (``.ipynb_checkpoints``) do not make a split folder non-empty. ``source``: where the data
    comes from, added to the message.

    Raises:
        DatasetNotFoundError: naming what is missing and the layout expected.
    """
    root = Path(root).expanduser()
    folders = [root / train_dir, root / val_dir]
    missing = [p for p in folders if not p.is_dir() or not visible_entries(p)] if splits else []
    if not root.is_dir():
        what = f"image folder {root} not found"
    elif missing:
        what = f"{', '.join(str(p) for p in missing)} missing or empty"
    else:
        return root
    raise DatasetNotFoundError(
        f"{what}: --dataset folder reads the ImageFolder layout {folders[0]}/<class>/<image> and "
        f"{folders[1]}/<class>/<image> (one folder per class, the same class folders in both; images .jpg, .png, "
        f"...){'; ' + source if source else ''}; give that folder as --data-dir, then run `teskd-scan ROOT` once to "
        "check every file"
    )


# The former name (the folder dataset was called "imagenet").
check_imagenet_root = check_folder_root


def make_image_loader(backend: str, index: FolderIndex, **kwargs) -> ImageLoaderBase:
    """The ``backend``'s loader over ``index`` (keyword arguments: those of ``ImageLoaderBase``)."""
    spec = loader_backend(backend)
    return getattr(importlib.import_module(spec.module), spec.class_name)(index, **kwargs)


def imagenet_loaders(root, batch_size=256, backend=None, image_size=224, val_resize=256, device=None, rank=0,
                     world_size=1, workers=None, *, seed=0, drop_last=False, channels_last=False,
                     dtype=torch.float32, eval_batch_size=None, val_image_size=None, scan_cache=None,
                     use_scan=True, train_dir="train", val_dir="val", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     crop_scale=TRAIN_SCALE, augment="rrc") -> tuple[ImageLoaderBase, ImageLoaderBase]:
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
        workers: DataLoader processes (default: min(8, cores / world_size)); with DALI its CPU threads (default:
            the cores over the ranks on this node, see ``teskd_fast.data.dali.dali_threads``).
        seed: seeds each epoch's order (and DALI's / nvjpeg's augmentation).
        drop_last: drop the incomplete last training batch.
        channels_last, dtype: memory format and float32 / bfloat16 / float16 output.
        scan_cache: cache written by ``teskd-scan`` (default: ``teskd_scan.json`` in ROOT or the split folder,
            used when present); use_scan=False ignores it.
        mean, std: the normalisation (3 values each, in [0, 1] units; default ImageNet's); ``mean="data"``:
            both computed from up to 1000 training images (:func:`teskd_fast.data.image_base.folder_statistics`).
        crop_scale: the random-resized crop's area fraction range (default 0.08-1, torchvision's).
        augment: "rrc" (random-resized crop, flip) or "pad-crop" (resize to ``image_size`` square, zero-pad by an
            eighth of it, random crop back, flip: CIFAR's augmentation, for small images).

    Shapes:
        each loader yields images [B, 3, S, S] normalised (``mean``, ``std``), and labels [B] int64.

    Returns:
        (train, val) loaders with len(), ``classes``, ``set_epoch``, ``set_image_size``, ``state_dict``.
    """
    root = check_folder_root(root, train_dir, val_dir, splits=False)
    device = resolve_device(device)
    backend = default_backend(device) if backend is None else backend
    problem = backend_problem(backend, device)
    if problem:
        raise LOADER_BACKENDS[backend].error(problem)
    formats = LOADER_BACKENDS[backend].formats
    train_index = index_image_folder(root / train_dir, scan_cache=scan_cache, use_scan=use_scan, formats=formats)
    val_index = index_image_folder(root / val_dir, scan_cache=scan_cache, use_scan=use_scan, formats=formats)
    if train_index.classes != val_index.classes:
        only = sorted(set(train_index.classes) ^ set(val_index.classes))[:5]
        raise CorruptDatasetError(f"{root / train_dir} and {root / val_dir} hold different class folders (e.g. {only})")
    if isinstance(mean, str):
        if mean != "data":
            raise ValueError(f"mean must be 3 numbers or 'data' (computed from the training images), got {mean!r}")
        mean, std = folder_statistics(train_index, seed=seed)
    check_folder_options(mean, std, crop_scale, augment)
    common = dict(image_size=image_size, val_resize=val_resize, device=device, rank=rank, world_size=world_size,
                  workers=workers, seed=seed, channels_last=channels_last, dtype=dtype, mean=mean, std=std,
                  crop_scale=crop_scale, augment=augment)
    train = make_image_loader(backend, train_index, train=True, batch_size=batch_size, drop_last=drop_last, **common)
    common["image_size"] = val_image_size or image_size
    val = make_image_loader(backend, val_index, train=False, batch_size=eval_batch_size or batch_size, **common)
    return train, val
