"""MNIST-format datasets: IDX files found in torchvision's layout or flat, checked, held on the device, augmented."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from teskd_fast.data import CorruptDatasetError, DatasetNotFoundError, check_dataset
from teskd_fast.data.mnist import FILES, PAD, load_idx, mnist_loaders

FASHION = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, n_train=20, n_test=10, gz=True, seed=0, size=28) -> dict[str, np.ndarray]:
    """The four IDX files of a small random MNIST-format dataset in ``folder``; returns what they hold."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = FILES[split]
        arrays[images_name] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[labels_name] = rng.integers(0, 10, n, dtype=np.uint8)
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_idx_files_are_found_checked_and_served_from_the_device(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = write_idx(folder, gz=layout == "torchvision")
    check_dataset("fashion-mnist", tmp_path)
    train, test = mnist_loaders(tmp_path, batch_size=8, device="cpu", seed=3)
    assert train.classes[0] == "T-shirt/top" and len(train.classes) == 10
    # Evaluation: the stored images, normalised with the training set's mean and std, the channel repeated.
    x, y = zip(*test, strict=True)
    x, y = torch.cat(x), torch.cat(y)
    expected = (torch.from_numpy(arrays[FILES["test"][0]]).double() / 255 - MEAN) / STD
    assert x.shape == (10, 3, 28, 28) and x.dtype == torch.float32 and x.is_contiguous()
    for c in range(3):
        torch.testing.assert_close(x[:, c].double(), expected, rtol=0, atol=1e-5)
    assert y.tolist() == arrays[FILES["test"][1]].tolist()
    # Training: each image a 28 x 28 crop of the image zero-padded by PAD, flipped where the plan says (one gather).
    indices, offsets, flips = train.epoch_plan(0)
    assert int(offsets.max()) <= 2 * PAD and flips.any() and not flips.all()
    images = torch.from_numpy(arrays[FILES["train"][0]]).double()
    padded = torch.nn.functional.pad(images, (PAD,) * 4)
    got = torch.cat([b for b, _ in train])
    assert got.shape == (20, 3, 28, 28)  # batches of 8, 8 and 4
    for k in range(20):
        (dy, dx), i = offsets[k].tolist(), int(indices[k])
        crop = padded[i, dy : dy + 28, dx : dx + 28]
        crop = crop.flip(-1) if flips[k] else crop
        torch.testing.assert_close(got[k, 1].double(), (crop / 255 - MEAN) / STD, rtol=0, atol=1e-5)
    assert torch.equal(got[:, 0], got[:, 2])


def test_mnist_is_not_flipped_and_channels_last_gives_the_same_batches(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw")
    train, _ = mnist_loaders(tmp_path, dataset="mnist", batch_size=8, device="cpu")
    assert not train.epoch_plan(0)[2].any() and train.classes == [str(d) for d in range(10)]
    nhwc, _ = mnist_loaders(tmp_path, dataset="mnist", batch_size=8, device="cpu", channels_last=True)
    for (x, _), (xc, _) in zip(train, nhwc, strict=True):
        assert torch.equal(x, xc) and xc.is_contiguous(memory_format=torch.channels_last)


def _break(folder, case):
    """Spoil one file of a flat uncompressed dataset; returns (the file the message must name, a phrase)."""
    images, labels = (folder / FILES["train"][0], folder / FILES["train"][1])
    data = images.read_bytes()
    if case == "magic":
        images.write_bytes(b"\x00\x00\x08\x01" + data[4:])
        return images, "not an IDX file of unsigned bytes with 3 dimension"
    if case == "cut":
        images.write_bytes(data[: len(data) - 100])
        return images, "but its header declares 20 x 28 x 28"
    if case == "gzip":
        gz = images.with_name(images.name + ".gz")
        images.unlink()
        gz.write_bytes(b"not gzip at all")
        return gz, "cannot read it"
    if case == "pair":
        labels.write_bytes(_idx_bytes(np.zeros(19, np.uint8)))
        return labels, "holds 20 images but"
    if case == "labels":
        labels.write_bytes(_idx_bytes(np.full(20, 10, np.uint8)))
        return labels, r"labels in \[10, 10\], expected 0..9"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["magic", "cut", "gzip", "pair", "labels"])
def test_a_corrupt_idx_file_is_named(tmp_path, case):
    write_idx(tmp_path, gz=False)
    path, phrase = _break(tmp_path, case)
    with pytest.raises(CorruptDatasetError, match=phrase) as info:
        load_idx(tmp_path, "fashion-mnist")
    assert str(path) in str(info.value)


def test_missing_idx_files_say_what_is_missing_and_how_to_get_them(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist") as info:
        check_dataset("fashion-mnist", tmp_path)
    assert str(tmp_path / "FashionMNIST" / "raw") in str(info.value)
    write_idx(tmp_path, gz=False)
    (tmp_path / FILES["test"][1]).unlink()
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path} lacks {FILES['test'][1]}"):
        check_dataset("fashion-mnist", tmp_path)


def test_teskd_train_reads_fashion_mnist_from_the_installed_copy_without_data_dir():
    from teskd_fast.train.build import data_root
    from teskd_fast.train.config import resolve

    cfg = resolve({"preset": "fashion-mnist-demo"})
    assert data_root(cfg) == (FASHION if FASHION.is_dir() else Path("data"))
    assert data_root(resolve({"preset": "fashion-mnist-demo", "data_dir": "elsewhere"})) == Path("elsewhere")


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"{FASHION} is absent (apt-get install dataset-fashion-mnist)")
def test_the_installed_fashion_mnist():
    data = load_idx(FASHION, "fashion-mnist")
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28) and xtr.dtype == torch.uint8
    assert torch.bincount(ytr).tolist() == [6000] * 10 and torch.bincount(yte).tolist() == [1000] * 10
    # The statistics the loader normalises with are those of this training set.
    pixels = xtr.double() / 255
    assert abs(pixels.mean().item() - MEAN) < 1e-4 and abs(pixels.std().item() - STD) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the split resident in GPU memory")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(tmp_path, channels_last):
    write_idx(tmp_path, n_train=40, gz=False)
    cpu, _ = mnist_loaders(tmp_path, batch_size=16, device="cpu", seed=4, channels_last=channels_last)
    gpu, _ = mnist_loaders(tmp_path, batch_size=16, device="cuda", seed=4, channels_last=channels_last)
    for (x, y), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and xg.shape == x.shape and torch.equal(y, yg.cpu())
        assert xg.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(xg.cpu(), x, rtol=0, atol=1e-6)
