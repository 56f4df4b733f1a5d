"""ImageNet-style loaders on a small ImageFolder of real JPEG files: DALI (CPU mode, for real), torchvision, nvjpeg."""

import importlib.util
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from teskd_fast.data import IMAGENET_MEAN, IMAGENET_STD, DatasetNotFoundError, imagenet_loaders
from teskd_fast.data.folder import index_image_folder
from teskd_fast.data.nvjpeg import NvjpegImageLoader

# A stuck loader (a worker that never answers) fails the test instead of hanging the suite.
pytestmark = pytest.mark.timeout(300)

CLASSES = ["n01_tench", "n02_goldfish", "n03_shark"]
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
LOW, HIGH = (-MEAN / STD), ((1 - MEAN) / STD)

# DALI is installed by .ci/run (the dali extra); the GPU image has none.
needs_dali = pytest.mark.skipif(
    importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None,
    reason="DALI is not installed (pip install -e '.[dali]')",
)


def _photo(rng, h, w):
    # Smooth colour gradients plus noise: compressible like a photo, and different per image.
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1) * rng.uniform(0.3, 1.0, 3)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def write_jpegs(folder, rng, sizes):
    """JPEGs of the given (h, w) sizes in ``folder``: RGB, plus greyscale and CMYK ones."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        img = Image.fromarray(_photo(rng, h, w))
        mode = ("RGB", "L", "CMYK")[i % 3]
        img.convert(mode).save(folder / f"img_{i:03d}.JPEG", quality=90)


def make_image_folder(root, rng, per_class=5, splits=("train", "val")):
    from sklearn.datasets import load_sample_images

    samples = load_sample_images().filenames
    for split in splits:
        for name in CLASSES:
            sizes = [tuple(rng.integers(48, 160, 2)) for _ in range(per_class)]
            write_jpegs(root / split / name, rng, sizes)
        # scikit-learn's bundled photos (427 x 640 JPEGs) in the first two classes.
        for c, path in enumerate(samples):
            shutil.copy(path, root / split / CLASSES[c] / f"sk_{c}.JPEG")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imagenet"), np.random.default_rng(0))


def _expected_labels(root, split):
    return Counter(CLASSES.index(p.parent.name) for p in (root / split).glob("*/*.JPEG"))


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "torchvision"])
def test_backends_load_the_folder(folder, backend):
    train, val = imagenet_loaders(folder, batch_size=4, backend=backend, image_size=64, val_resize=72,
                                  device="cpu", workers=2, seed=1)
    assert train.classes == val.classes == CLASSES
    for loader, split in ((train, "train"), (val, "val")):
        labels = []
        for x, y in loader:
            assert x.shape[1:] == (3, 64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape[0] == y.shape[0] <= 4
            assert (x >= LOW - 1e-4).all() and (x <= HIGH + 1e-4).all(), "outside the normalised pixel range"
            labels.append(y)
        assert len(labels) == len(loader)
        assert Counter(torch.cat(labels).tolist()) == _expected_labels(folder, split)


@needs_dali
def test_backends_agree(folder):
    """Same class mapping, order and evaluation crops across DALI, torchvision and the nvjpeg code path."""
    kwargs = dict(batch_size=6, image_size=48, val_resize=56, device="cpu", workers=2, seed=3)
    out = {}
    for backend in ("dali", "torchvision"):
        train, val = imagenet_loaders(folder, backend=backend, **kwargs)
        out[backend] = (torch.cat([x for x, _ in val]), torch.cat([y for _, y in val]),
                        torch.cat([y for _, y in train]))
    index = index_image_folder(folder / "val")
    nv = NvjpegImageLoader(index, decode_device="cpu", train=False, batch_size=6, image_size=48, val_resize=56,
                           device="cpu", workers=1)
    out["nvjpeg"] = (torch.cat([x for x, _ in nv]), torch.cat([y for _, y in nv]), out["torchvision"][2])
    ref = out["torchvision"]
    for name, (x, y, train_y) in out.items():
        assert torch.equal(y, ref[1]) and torch.equal(train_y, ref[2]), f"{name}: other labels or order"
        # Different resampling filters: equal up to interpolation differences (normalised units, std ~ 1).
        err = (x - ref[0]).abs().mean()
        assert err < 0.1, f"{name}: evaluation crops differ from torchvision's by {err:.3f} on average"


@needs_dali
def test_dali_options_progressive_resize_and_resume(folder):
    train, _ = imagenet_loaders(folder, batch_size=4, backend="dali", image_size=40, val_resize=48, device="cpu",
                                workers=2, seed=5, channels_last=True, dtype=torch.bfloat16, drop_last=True)
    batches = list(train)
    assert len(batches) == len(train) == sum(_expected_labels(folder, "train").values()) // 4
    x = batches[0][0]
    assert x.dtype == torch.bfloat16 and x.shape == (4, 3, 40, 40)
    assert x.is_contiguous(memory_format=torch.channels_last)
    train.set_image_size(24)
    assert next(iter(train))[0].shape == (4, 3, 24, 24)
    # Epoch 1 from a mid-epoch state: the same remaining images (labels) in the same order.
    train.set_epoch(1)
    full = [y for _, y in train]
    train.set_epoch(1, start_batch=2)
    rest = [y for _, y in train]
    assert len(rest) == len(full) - 2
    assert all(torch.equal(a, b) for a, b in zip(rest, full[2:], strict=True))


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory):
    """7 classes of one image each: the label names the image, so shards can be compared."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in range(7):
            write_jpegs(root / split / f"class_{c}", rng, [(40 + 3 * c, 50)])
    return root


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "torchvision"])
def test_two_ranks_are_disjoint_and_complete(one_per_class, backend):
    seen = {"train": [], "val": []}
    for rank in (0, 1):
        train, val = imagenet_loaders(one_per_class, batch_size=2, backend=backend, image_size=32, val_resize=32,
                                      device="cpu", rank=rank, world_size=2, workers=1, seed=11)
        assert len(train) == 2
        seen["train"].append([int(v) for _, y in train for v in y])
        seen["val"].append([int(v) for _, y in val for v in y])
    assert [len(s) for s in seen["train"]] == [3, 3], "training shards must be equal"
    assert not set(seen["train"][0]) & set(seen["train"][1])
    assert not set(seen["val"][0]) & set(seen["val"][1])
    assert sorted(seen["val"][0] + seen["val"][1]) == list(range(7)), "evaluation shards must cover the split"


def test_nvjpeg_code_path_on_cpu_decoder(folder):
    index = index_image_folder(folder / "train")
    loader = NvjpegImageLoader(index, decode_device="cpu", train=True, batch_size=5, image_size=32, device="cpu",
                               workers=2, seed=4)
    first = list(loader)
    assert Counter(int(v) for _, y in first for v in y) == _expected_labels(folder, "train")
    assert all(x.shape[1:] == (3, 32, 32) and (x >= LOW - 1e-4).all() and (x <= HIGH + 1e-4).all() for x, _ in first)
    # Per-batch seeds: a resumed epoch reproduces the remaining batches exactly.
    loader.set_epoch(0, start_batch=1)
    for (x, y), (xr, yr) in zip(first[1:], loader, strict=True):
        assert torch.equal(x, xr) and torch.equal(y, yr)


def test_nvjpeg_needs_cuda(folder):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the real nvjpeg test runs instead")
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        imagenet_loaders(folder, backend="nvjpeg", device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg decodes on the GPU: needs a CUDA device")
def test_nvjpeg_on_cuda(folder):
    train, val = imagenet_loaders(folder, batch_size=4, backend="nvjpeg", image_size=64, device="cuda", workers=2)
    for loader, split in ((train, "train"), (val, "val")):
        labels = []
        for x, y in loader:
            assert x.is_cuda and x.shape[1:] == (3, 64, 64)
            labels.append(y.cpu())
        assert Counter(torch.cat(labels).tolist()) == _expected_labels(folder, split)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="DALI's GPU decoding (device='mixed') needs CUDA")
def test_dali_on_cuda(folder):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed on this GPU machine")
    train, val = imagenet_loaders(folder, batch_size=4, backend="dali", image_size=64, device="cuda", workers=2)
    x, y = next(iter(train))
    assert x.is_cuda and y.is_cuda and x.shape == (4, 3, 64, 64)


def test_missing_root_and_empty_class(tmp_path, folder):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nope")):
        imagenet_loaders(tmp_path / "nope", backend="torchvision", device="cpu")
    (tmp_path / "train" / "cls").mkdir(parents=True)
    # The folder index (shared by every backend) rejects the empty class before any decoder starts.
    with pytest.raises(DatasetNotFoundError, match=r"cls holds no image file.*teskd-scan"):
        imagenet_loaders(tmp_path, backend="torchvision", device="cpu")
    with pytest.raises(ValueError, match="backend"):
        imagenet_loaders(folder, backend="pil", device="cpu")


@needs_dali
def test_dali_a_file_spoilt_between_passes_is_named(tmp_path):
    # The second pass restarts the reused pipeline, which reads its first batches at once: an unreadable file there
    # must still be a BadImageError naming it, not an OSError from inside the restart.
    from teskd_fast.data import BadImageError

    root = tmp_path / "data"
    rng = np.random.default_rng(3)
    for c in range(2):
        write_jpegs(root / "train" / f"class_{c}", rng, [(40, 48)] * 2)
        write_jpegs(root / "val" / f"class_{c}", rng, [(40, 48)])
    train, _ = imagenet_loaders(root, batch_size=4, backend="dali", image_size=32, val_resize=32, device="cpu",
                                workers=1, drop_last=True)
    assert len(list(train)) == 1
    for path in (root / "train").glob("*/*.JPEG"):
        path.write_bytes(b"not an image at all")
    train.set_epoch(1)
    with pytest.raises(BadImageError, match=r"class_\d/img_\d+\.JPEG"):
        list(train)


def test_worker_processes_are_forked_without_garbage(folder):
    # A forked worker inherits the parent's uncollected garbage and may collect it itself: an earlier loader's
    # DALI pipeline collected there hung in its __del__ (test_data_scan, by the chance of collection order).
    import gc

    collected_in = []

    class Finalised:
        def __init__(self):
            self.cycle = self

        def __del__(self):
            collected_in.append(os.getpid())

    train, _ = imagenet_loaders(folder, batch_size=4, backend="torchvision", image_size=32, val_resize=36,
                                device="cpu", workers=1)
    enabled = gc.isenabled()
    gc.disable()
    try:
        Finalised()  # garbage in a reference cycle, left for the collector
        next(iter(train))
    finally:
        if enabled:
            gc.enable()
    assert collected_in == [os.getpid()]  # collected here, before the fork
