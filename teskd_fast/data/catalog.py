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


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: how to check it is there, how to load it, and whether it takes a loader backend.

    Attributes:
        check: ``check(root, download)`` raises :class:`~teskd_fast.data.DatasetNotFoundError` (naming where it
            looked and how to get the data) when the dataset is not under ``root``.
        loaders: ``loaders(request) -> (train, val)``, two :class:`~teskd_fast.data.protocol.Loader` objects.
        uses_backend: the dataset is read by an ImageFolder loader backend (``--loader``).
    """

    check: Callable[[Path, bool], None]
    loaders: Callable[[LoaderRequest], tuple[Loader, Loader]]
    uses_backend: bool = False


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


def _check_imagenet(root: Path, download: bool) -> None:
    from teskd_fast.data.imagenet import check_imagenet_root

    check_imagenet_root(root)


def _imagenet(req: LoaderRequest) -> tuple[Loader, Loader]:
    from teskd_fast.data.imagenet import imagenet_loaders

    return imagenet_loaders(str(req.root), batch_size=req.batch_size, backend=req.backend,
                            image_size=req.first_image_size or req.image_size, val_resize=req.val_resize,
                            val_image_size=req.val_image_size, device=req.device, rank=req.rank,
                            world_size=req.world_size, workers=req.workers, seed=req.seed,
                            channels_last=req.channels_last)


# name -> how to check and load it; the order is the one --dataset lists.
DATASETS: dict[str, DatasetSpec] = {
    # scikit-learn's bundled digits: always there.
    "digits": DatasetSpec(_nothing_to_check, _digits),
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    # Any ImageFolder tree ROOT/train/<class>/*.JPEG, ROOT/val/<class>/*.JPEG; "imagenet" is its older name.
    "folder": DatasetSpec(_check_imagenet, _imagenet, uses_backend=True),
    "imagenet": DatasetSpec(_check_imagenet, _imagenet, uses_backend=True),
}


def dataset_spec(dataset: str) -> DatasetSpec:
    """The registry entry of ``dataset``; a ValueError names the known ones."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {dataset!r}")
    return DATASETS[dataset]


def check_dataset(dataset: str, root: str | Path, download: bool = False) -> None:
    """Fail early when ``dataset`` is not under ``root``, saying where it looked and how to get it.

    Args:
        dataset: a name of :data:`DATASETS`: "digits" (built in: always there), "cifar10", "cifar100" or
            "imagenet" (ImageFolder layout).
        root: the dataset folder (CIFAR: holding the python-version archive or its extracted folder).
        download: CIFAR will be downloaded when missing, so its absence is no error.

    Raises:
        DatasetNotFoundError: the dataset is not there; the message names the paths it looked at.
    """
    dataset_spec(dataset).check(Path(root), download)
