"""MNIST-format datasets (Fashion-MNIST, MNIST) from their IDX files, held whole on the device.

The four IDX files torchvision's ``MNIST`` / ``FashionMNIST`` read (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each as it is or ``.gz``) are
found under ``root`` in torchvision's layout (``root/FashionMNIST/raw/``), in ``root/FashionMNIST/`` or in
``root`` itself (Debian's ``dataset-fashion-mnist`` package: ``/usr/share/datasets/fashion-mnist``).

The loader is the CIFAR loader (:class:`teskd_fast.data.cifar.CifarLoader`): the split resident on the device as
uint8 [N, 1, 28, 28], a training batch one gather with the random crop (zero padding ``PAD``) and, for
Fashion-MNIST, the horizontal flip folded into its indices. The single channel is normalised with the training
set's mean and std, then repeated to 3 channels: every network of the package (the ResNets' stems, timm models,
``--init`` weights) takes 3, and only the first convolution sees the copies (3 x its multiply-adds on a 28 x 28
input; nothing else changes).
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from teskd_fast.data.cifar import CifarLoader
from teskd_fast.data.common import CorruptDatasetError, DatasetNotFoundError

# Zero padding of the training crop (28 px images: 2, as CIFAR's 4 at 32 px is an eighth of the side, rounded down).
PAD = 2
# The IDX header: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions.
_UBYTE = 0x08
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxDataset:
    """One MNIST-format dataset: its torchvision folder name, classes, statistics and augmentation."""

    name: str
    folder: str
    classes: tuple[str, ...]
    mean: float
    std: float
    flip: bool
    default_root: str
    source: str


IDX_DATASETS: dict[str, IdxDataset] = {
    # Mean and std: of the 60,000 training images, in [0, 1].
    "fashion-mnist": IdxDataset(
        "fashion-mnist", "FashionMNIST",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        0.2860, 0.3530, True, "/usr/share/datasets/fashion-mnist",
        "on Debian or Ubuntu: apt-get install dataset-fashion-mnist (installs /usr/share/datasets/fashion-mnist); "
        "or --download (torchvision's downloader, into DIR/FashionMNIST/raw)"),
    # Digits are not mirror-symmetric: no flip.
    "mnist": IdxDataset(
        "mnist", "MNIST", tuple(str(d) for d in range(10)), 0.1307, 0.3081, False, "",
        "--download (torchvision's downloader, into DIR/MNIST/raw), or the four IDX files from "
        "https://yann.lecun.com/exdb/mnist/ (as they are, .gz, or extracted)"),
}


def idx_dataset(name: str) -> IdxDataset:
    if name not in IDX_DATASETS:
        raise ValueError(f"dataset must be one of {tuple(IDX_DATASETS)}, got {name!r}")
    return IDX_DATASETS[name]


def default_root(name: str) -> Path | None:
    """Where ``name`` is looked for when no folder is given: the system's copy, when it is installed."""
    path = idx_dataset(name).default_root
    return Path(path) if path and Path(path).is_dir() else None


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate_idx(root, name: str) -> dict[str, tuple[Path, Path]]:
    """The IDX files of ``name`` under ``root``: ``{"train": (images, labels), "test": (images, labels)}``.

    Looks in ``root/<Folder>/raw`` (torchvision's layout), ``root/<Folder>`` and ``root`` (``<Folder>``:
    ``FashionMNIST`` or ``MNIST``); the first folder holding all four files wins.

    Raises:
        DatasetNotFoundError: no folder holds the four files; the message names the folders and the files looked
            for, what was missing, and how to get the dataset.
    """
    spec = idx_dataset(name)
    root = Path(root).expanduser()
    folders = [root / spec.folder / "raw", root / spec.folder, root]
    best = None
    for folder in folders:
        found = {stem: _find(folder, stem) for pair in FILES.values() for stem in pair}
        if all(found.values()):
            return {split: (found[a], found[b]) for split, (a, b) in FILES.items()}
        missing = [stem for stem, path in found.items() if path is None]
        if len(missing) < 4 and best is None:
            best = (folder, missing)
    detail = (f"{best[0]} lacks {', '.join(best[1])} (or .gz)" if best else
              f"none of {', '.join(str(f) for f in folders)} holds its IDX files ({', '.join(FILES['train'])}, "
              f"{', '.join(FILES['test'])}, as they are or .gz)")
    raise DatasetNotFoundError(f"{name} not found under {root}: {detail}. Get it: {spec.source}")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of the IDX file at ``path`` (gzip-compressed when its name ends in .gz), ``ndim`` dimensions.

    Raises:
        CorruptDatasetError: naming the file: not gzip or cut short, a wrong magic number (not IDX, not unsigned
            bytes, another number of dimensions), or a size that is not the header's.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise CorruptDatasetError(f"{path}: cannot read it ({e}); download or install it again") from e
    header = 4 + 4 * ndim
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != _UBYTE or data[3] != ndim:
        found = data[:4].hex() if len(data) >= 4 else f"{len(data)} bytes"
        raise CorruptDatasetError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) (magic "
                                  f"0000{_UBYTE:02x}{ndim:02x} expected, found {found})")
    if len(data) < header:
        raise CorruptDatasetError(f"{path}: cut short inside its header ({len(data)} bytes)")
    dims = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise CorruptDatasetError(f"{path}: {len(data)} bytes, but its header declares {' x '.join(map(str, dims))} "
                                  f"values ({expected} bytes): cut short or not this file")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def load_idx(root, name: str = "fashion-mnist") -> dict[str, Any]:
    """Read an MNIST-format dataset's two splits.

    Shapes:
        images: [N, 1, H, W] uint8 (28 x 28 for MNIST and Fashion-MNIST); labels: [N] int64.

    Returns:
        dict with "train" and "test", each (images, labels), and "classes".

    Raises:
        DatasetNotFoundError: files missing (see :func:`locate_idx`).
        CorruptDatasetError: a file that is not what it should be (see :func:`read_idx`), images and labels of
            different counts, labels outside the classes, or splits of different image sizes.
    """
    spec = idx_dataset(name)
    out: dict[str, Any] = {"classes": list(spec.classes)}
    for split, (images_path, labels_path) in locate_idx(root, name).items():
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if len(images) != len(labels) or len(images) == 0:
            raise CorruptDatasetError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} "
                                      "labels: the files are not a pair")
        if labels.max() >= len(spec.classes):
            raise CorruptDatasetError(f"{labels_path}: labels in [{labels.min()}, {labels.max()}], expected "
                                      f"0..{len(spec.classes) - 1}")
        out[split] = (torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))
    if out["train"][0].shape[2:] != out["test"][0].shape[2:]:
        raise CorruptDatasetError(f"{name} under {root}: training images {tuple(out['train'][0].shape[2:])}, test "
                                  f"images {tuple(out['test'][0].shape[2:])}; the splits must have one size")
    return out


def download_idx(root, name: str) -> None:
    """Fetch ``name`` into ``root/<Folder>/raw`` with torchvision's downloader."""
    from torchvision import datasets

    cls = datasets.FashionMNIST if name == "fashion-mnist" else datasets.MNIST
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:
        raise DatasetNotFoundError(f"downloading {name} into {root} failed ({e}); {idx_dataset(name).source}") from e


def mnist_loaders(root, dataset="fashion-mnist", batch_size=128, device="cuda", seed=27, drop_last=False,
                  download=False, *, rank=0, world_size=1, channels_last=False, dtype=torch.float32,
                  eval_batch_size=None) -> tuple[CifarLoader, CifarLoader]:
    """Training and test loaders over Fashion-MNIST or MNIST, the whole split resident on ``device``.

    Args: as :func:`teskd_fast.data.cifar_loaders` (``dataset``: "fashion-mnist" or "mnist"); training batches are
    random 28 x 28 crops of the image zero-padded by ``PAD`` pixels (and flipped with p = 0.5 for Fashion-MNIST).

    Shapes:
        each loader yields images [B, 3, 28, 28] (the normalised channel repeated) and labels [B] int64.
    """
    spec = idx_dataset(dataset)
    try:
        locate_idx(root, dataset)
    except DatasetNotFoundError:
        if not download:
            raise
        download_idx(root, dataset)
    data = load_idx(root, dataset)
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size, channels_last=channels_last,
                  dtype=dtype, classes=data["classes"], mean=(spec.mean,), std=(spec.std,), pad=PAD, flip=spec.flip,
                  out_channels=3)
    train = CifarLoader(*data["train"], batch_size=batch_size, train=True, drop_last=drop_last, **common)
    test = CifarLoader(*data["test"], batch_size=eval_batch_size or batch_size, train=False, drop_last=False,
                       **common)
    return train, test
