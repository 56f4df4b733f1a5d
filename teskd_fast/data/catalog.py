"""The datasets the package reads: one registry (:data:`DATASETS`) of how to check and load each.

The training command's ``--dataset`` choices, its configuration check and its data builder all read
:data:`DATASETS`; a new dataset is one more entry here (see docs/extending.md). :func:`check_dataset` says
before anything is built whether a dataset is where a caller says; the loaders raise the same errors
(:class:`~teskd_fast.data.DatasetError` and its kinds) for whatever only reading the data reveals (an empty
class folder, a missing or corrupt CIFAR file, an undecodable image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from teskd_fast.data.protocol import Loader


@dataclass(frozen=True)
class LoaderRequest:
    """What a training process asks of a dataset's loaders; each dataset reads the fields it needs.

    Args:
        root: the dataset folder (unused by the built-in digits).
        batch_size: training batch of THIS process.
        device: where batches are delivered.
        seed: seed of the order and the augmentation.
        rank, world_size: this process's shard.
        channels_last: channels_last memory format.
        download: fetch the dataset when missing (where the dataset can be downloaded).
        image_size: training image side (digits: the upsampled side; ImageNet: the final crop).
        first_image_size: ImageNet's training crop of the first epoch (progressive resizing changes it later
            through ``set_image_size``); None: ``image_size``.
        val_image_size, val_resize: ImageNet evaluation: the centre crop after resizing the shorter side.
        backend: the ImageFolder loader backend (:data:`teskd_fast.data.imagenet.LOADER_BACKENDS`); None: the
            default of :func:`teskd_fast.data.imagenet.default_backend`.
        workers: data loading processes (ImageNet).
        norm_mean, norm_std: the folder data's normalisation (3 values each; empty: ImageNet's);
            norm_from_data: computed from the training images instead.
        crop_scale: the folder data's random-resized crop area range (empty: :func:`folder_defaults`).
        augment: "rrc", "pad-crop" or "auto" (:func:`folder_defaults`).
    """

    root: Path
    batch_size: int
    device: torch.device
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False
    download: bool = False
    image_size: int = 224
    first_image_size: int | None = None
    val_image_size: int = 224
    val_resize: int = 256
    backend: str | None = None
    workers: int | None = None
    norm_mean: tuple[float, ...] = ()
    norm_std: tuple[float, ...] = ()
    norm_from_data: bool = False
    crop_scale: tuple[float, ...] = ()
    augment: str = "auto"


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: how to check it is there, how to load it, and whether it takes a loader backend.

    Attributes:
        check: ``check(root, download)`` raises :class:`~teskd_fast.data.DatasetNotFoundError` (naming where it
            looked and how to get the data) when the dataset is not under ``root``.
        loaders: ``loaders(request) -> (train, val)``, two :class:`~teskd_fast.data.protocol.Loader` objects.
        uses_backend: the dataset is read by an ImageFolder loader backend (``--loader``).
        default_root: where the dataset is read when no folder is given (``teskd-train`` without ``--data-dir``),
            or None (then ``./data``): a copy the system installed, when it is there.
    """

    check: Callable[[Path, bool], None]
    loaders: Callable[[LoaderRequest], tuple[Loader, Loader]]
    uses_backend: bool = False
    default_root: Callable[[], Path | None] = lambda: None


def _nothing_to_check(root: Path, download: bool) -> None:
    return None


def _digits(req: LoaderRequest) -> tuple[Loader, Loader]:
    from teskd_fast.data.digits import digits_loaders

    return digits_loaders(batch_size=req.batch_size, device=req.device, seed=req.seed, rank=req.rank,
                          world_size=req.world_size, image_size=req.image_size, channels_last=req.channels_last)


def _cifar(name: str) -> DatasetSpec:
    def check(root: Path, download: bool) -> None:
        from teskd_fast.data.cifar import locate_cifar

        if not download:
            locate_cifar(root, name)

    def loaders(req: LoaderRequest) -> tuple[Loader, Loader]:
        from teskd_fast.data.cifar import cifar_loaders

        return cifar_loaders(str(req.root), dataset=name, batch_size=req.batch_size, device=req.device,
                             seed=req.seed, download=req.download, rank=req.rank, world_size=req.world_size,
                             channels_last=req.channels_last)

    return DatasetSpec(check, loaders)


def _idx(name: str) -> DatasetSpec:
    """An MNIST-format dataset (IDX files), held on the device like CIFAR (:mod:`teskd_fast.data.mnist`)."""
    def check(root: Path, download: bool) -> None:
        from teskd_fast.data.mnist import locate_idx

        if not download:
            locate_idx(root, name)

    def loaders(req: LoaderRequest) -> tuple[Loader, Loader]:
        from teskd_fast.data.mnist import mnist_loaders

        return mnist_loaders(req.root, dataset=name, batch_size=req.batch_size, device=req.device, seed=req.seed,
                             download=req.download, rank=req.rank, world_size=req.world_size,
                             channels_last=req.channels_last)

    def default_root() -> Path | None:
        from teskd_fast.data.mnist import default_root

        return default_root(name)

    return DatasetSpec(check, loaders, default_root=default_root)


def _check_folder(root: Path, download: bool) -> None:
    from teskd_fast.data.imagenet import check_folder_root

    check_folder_root(root)


def _check_imagenet(root: Path, download: bool) -> None:
    from teskd_fast.data.imagenet import check_folder_root

    check_folder_root(root, source="for ImageNet itself: ILSVRC-2012 from https://image-net.org/download, its "
                                   "validation images sorted into class folders")


def folder_defaults(image_size: int) -> tuple[str, tuple[float, float]]:
    """The folder data's training augmentation and crop area range that fit ``image_size``: the pad-crop (CIFAR's)
    at 64 px and below, where a random-resized crop of 8 % of the area leaves a few pixels; above it the
    random-resized crop, over 0.25-1 of the area below 128 px and torchvision's 0.08-1 from 128 px."""
    augment = "pad-crop" if image_size <= 64 else "rrc"
    return augment, (0.08, 1.0) if image_size >= 128 else (0.25, 1.0)


def _folder(req: LoaderRequest) -> tuple[Loader, Loader]:
    from teskd_fast.data.common import IMAGENET_MEAN, IMAGENET_STD
    from teskd_fast.data.imagenet import imagenet_loaders

    augment, scale = folder_defaults(req.image_size)
    mean = "data" if req.norm_from_data else req.norm_mean or IMAGENET_MEAN
    return imagenet_loaders(str(req.root), batch_size=req.batch_size, backend=req.backend,
                            image_size=req.first_image_size or req.image_size, val_resize=req.val_resize,
                            val_image_size=req.val_image_size, device=req.device, rank=req.rank,
                            world_size=req.world_size, workers=req.workers, seed=req.seed,
                            channels_last=req.channels_last, mean=mean, std=req.norm_std or IMAGENET_STD,
                            crop_scale=req.crop_scale or scale,
                            augment=augment if req.augment == "auto" else req.augment)


# name -> how to check and load it; the order is the one --dataset lists.
DATASETS: dict[str, DatasetSpec] = {
    # scikit-learn's bundled digits: always there.
    "digits": DatasetSpec(_nothing_to_check, _digits),
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    # The IDX files of torchvision's FashionMNIST / MNIST (root/FashionMNIST/raw/, or flat; .gz or not).
    "fashion-mnist": _idx("fashion-mnist"),
    "mnist": _idx("mnist"),
    # Any ImageFolder tree ROOT/train/<class>/<image>, ROOT/val/<class>/<image>.
    "folder": DatasetSpec(_check_folder, _folder, uses_backend=True),
}
# Other names of a dataset: "imagenet", the folder dataset's former name (the ImageNet presets keep using it):
# the same loaders, and a missing folder's message that also says where ImageNet comes from.
DATASET_ALIASES: dict[str, str] = {"imagenet": "folder"}
DATASETS["imagenet"] = DatasetSpec(_check_imagenet, _folder, uses_backend=True)


def dataset_spec(dataset: str) -> DatasetSpec:
    """The registry entry of ``dataset``; a ValueError names the known ones."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {dataset!r}")
    return DATASETS[dataset]


def check_dataset(dataset: str, root: str | Path, download: bool = False) -> None:
    """Fail early when ``dataset`` is not under ``root``, saying where it looked and how to get it.

    Args:
        dataset: a name of :data:`DATASETS`: "digits" (built in: always there), "cifar10", "cifar100",
            "folder" (any ImageFolder tree; "imagenet" is another name of it), "fashion-mnist" or "mnist".
        root: the dataset folder (CIFAR: holding the python-version archive or its extracted folder).
        download: CIFAR will be downloaded when missing, so its absence is no error.

    Raises:
        DatasetNotFoundError: the dataset is not there; the message names the paths it looked at.
    """
    dataset_spec(dataset).check(Path(root), download)
