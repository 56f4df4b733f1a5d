"""Data loading for teskd_fast: device-resident CIFAR and Fashion-MNIST / MNIST, image folders (ImageNet or your own)
through DALI / nvjpeg / torchvision, file scans.

DALI is imported only when a DALI loader is built, so ``import teskd_fast.data`` works without it.
"""

from teskd_fast.data.catalog import DATASETS, check_dataset
from teskd_fast.data.cifar import CifarLoader, cifar_loaders, load_cifar
from teskd_fast.data.common import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BadImageError,
    CorruptDatasetError,
    DatasetError,
    DatasetNotFoundError,
)
from teskd_fast.data.imagenet import imagenet_loaders
from teskd_fast.data.mnist import load_idx, mnist_loaders
from teskd_fast.data.protocol import Loader
from teskd_fast.data.scan import scan_image_folder

__all__ = [
    "cifar_loaders",
    "imagenet_loaders",
    "mnist_loaders",
    "load_idx",
    "scan_image_folder",
    "load_cifar",
    "CifarLoader",
    "Loader",
    "check_dataset",
    "DATASETS",
    "DatasetError",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "BadImageError",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
