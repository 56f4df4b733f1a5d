"""Normalisation in the loaders: the constants equal the formula, and they are made once per loader, not per batch.

Building ``torch.tensor(list, device=...)`` per batch is a host-to-device copy from pageable memory (which
waits for the host) every batch on a GPU. The profiler shows each such build as ``aten::lift_fresh``.
"""

import numpy as np
import pytest
import torch
from test_data_imagenet import make_image_folder
from torch.profiler import ProfilerActivity, profile

from teskd_fast.data import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, imagenet_loaders
from teskd_fast.data.cifar import CifarLoader
from teskd_fast.data.common import normalize_, normalize_constants
from teskd_fast.data.folder import index_image_folder
from teskd_fast.data.nvjpeg import NvjpegImageLoader

HAS_CUDA = torch.cuda.is_available()
FROM_HOST_LIST = "aten::lift_fresh"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), np.random.default_rng(0), per_class=2)


def _host_list_builds(fn):
    """How many tensors ``fn()`` builds from Python data in this process (the profiler's ``aten::lift_fresh``)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == FROM_HOST_LIST)


@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, IMAGENET_STD), (CIFAR_MEAN, CIFAR_STD)])
def test_constants_equal_the_formula_in_float64(mean, std):
    x = torch.randint(0, 256, (3, 3, 5, 7), dtype=torch.float64)
    expected = (x / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    constants = normalize_constants(mean, std, "cpu", torch.float64)
    torch.testing.assert_close(normalize_(x.clone(), mean, std, constants), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(normalize_(x.clone(), mean, std), expected, atol=1e-12, rtol=0)


def test_the_profiler_sees_a_per_call_build():
    # The count below can fail: normalize_ without constants builds two tensors from lists per call.
    x = torch.rand(2, 3, 4, 4) * 255
    assert _host_list_builds(lambda: normalize_(x, IMAGENET_MEAN, IMAGENET_STD)) == 2
    constants = normalize_constants(IMAGENET_MEAN, IMAGENET_STD, "cpu")
    assert _host_list_builds(lambda: normalize_(x, IMAGENET_MEAN, IMAGENET_STD, constants)) == 0


def _image_loader(folder, backend, device):
    """The validation loader of ``backend``; nvjpeg's code path decodes on ``device`` (the CPU here)."""
    if backend == "nvjpeg":
        return NvjpegImageLoader(index_image_folder(folder / "val"), decode_device=device, train=False,
                                 batch_size=3, image_size=32, val_resize=40, device=device, workers=1)
    _, val = imagenet_loaders(folder, batch_size=3, backend=backend, image_size=32, val_resize=40, device=device,
                              workers=1)
    return val


def _cifar(device, train):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (40,), generator=g)
    return CifarLoader(images, labels, batch_size=8, train=train, device=device, channels_last=True)


def _batches_build_nothing_from_lists(loader):
    constants = loader._constants
    ptrs = [c.data_ptr() for c in constants]
    batches = []
    assert _host_list_builds(lambda: batches.extend(loader)) == 0
    assert len(batches) == len(loader) >= 2
    # The loader keeps the same constants (the same storage) across batches and passes.
    assert loader._constants is constants and [c.data_ptr() for c in constants] == ptrs
    return batches


@pytest.mark.parametrize("backend", ["torchvision", "nvjpeg"])
def test_image_loaders_normalise_with_constants_made_once(folder, backend):
    loader = _image_loader(folder, backend, "cpu")
    batches = _batches_build_nothing_from_lists(loader)
    scale, bias = loader._constants
    assert scale.shape == bias.shape == (1, 3, 1, 1) and scale.device == bias.device == loader.device
    for x, _ in batches:
        # Normalised pixels: back to [0, 255] with the formula's inverse.
        pixels = (x.double() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).double()
                  + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).double()) * 255
        assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3


@pytest.mark.parametrize("train", [True, False])
def test_cifar_loader_normalises_with_constants_made_once(train):
    _batches_build_nothing_from_lists(_cifar("cpu", train))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("train", [True, False])
def test_cuda_cifar_batches_copy_nothing_from_the_host(train):
    loader = _cifar("cuda", train)
    batches = iter(loader)
    next(batches)
    torch.cuda.synchronize()
    # After the pass's start (its plan copied once), a batch neither builds from lists nor waits for the host.
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert _host_list_builds(lambda: [b for b in batches]) == 0
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loader._constants[0].device == loader.device


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_torchvision_loader_normalises_with_constants_made_once(folder):
    loader = _image_loader(folder, "torchvision", "cuda")
    batches = _batches_build_nothing_from_lists(loader)
    assert all(x.device == loader.device for x, _ in batches)
