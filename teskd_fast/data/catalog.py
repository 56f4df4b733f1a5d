"""The datasets the package reads, and the one check of whether a dataset is where a caller says.

The training command asks :func:`check_dataset` before it builds anything; the loaders raise the same errors
(:class:`~teskd_fast.data.DatasetError` and its kinds) for whatever only reading the data reveals (an empty
class folder, a missing or corrupt CIFAR file, an undecodable image).
"""

from teskd_fast.data.cifar import locate_cifar
from teskd_fast.data.imagenet import check_imagenet_root

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")


def check_dataset(dataset, root, download=False):
    """Fail early when ``dataset`` is not under ``root``, saying where it looked and how to get it.

    Args:
        dataset: "digits" (built in: always there), "cifar10", "cifar100" or "imagenet" (ImageFolder layout).
        root: the dataset folder (CIFAR: holding the python-version archive or its extracted folder).
        download: CIFAR will be downloaded when missing, so its absence is no error.

    Raises:
        DatasetNotFoundError: the dataset is not there; the message names the paths it looked at.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    if dataset in ("cifar10", "cifar100") and not download:
        locate_cifar(root, dataset)
    elif dataset == "imagenet":
        check_imagenet_root(root)
