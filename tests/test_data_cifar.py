"""CIFAR loader: archive formats, shapes, labels, normalisation, augmentation distribution, order, sharding."""

import pickle
import re
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from teskd_fast.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    CifarLoader,
    CorruptDatasetError,
    DatasetNotFoundError,
    cifar_loaders,
)

# A stuck loader (a worker that never answers) fails the test instead of hanging the suite.
pytestmark = pytest.mark.timeout(300)

N_TRAIN, N_TEST = 240, 70
MEAN = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def _images(n, rng):
    # Channels 0 and 1 random; channel 2 constant = index + 1, so any crop names its source image.
    x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    x[:, 2] = (np.arange(n) + 1)[:, None, None]
    return x


def _write(folder, name, obj):
    with open(folder / name, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _make_cifar(base, dataset, rng):
    """Write the python-version folder and .tar.gz of ``dataset`` under ``base``; return the raw arrays."""
    classes = 100 if dataset == "cifar100" else 10
    folder = base / ("cifar-100-python" if dataset == "cifar100" else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    train_x, test_x = _images(N_TRAIN, rng), _images(N_TEST, rng)
    train_y = rng.integers(0, classes, N_TRAIN)
    test_y = rng.integers(0, classes, N_TEST)
    if dataset == "cifar100":
        _write(folder, "train", {"data": train_x.reshape(N_TRAIN, -1), "fine_labels": train_y.tolist(),
                                 "coarse_labels": (train_y // 5).tolist()})
        _write(folder, "test", {"data": test_x.reshape(N_TEST, -1), "fine_labels": test_y.tolist(),
                                "coarse_labels": (test_y // 5).tolist()})
        _write(folder, "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                                "coarse_label_names": [f"s{i}" for i in range(20)]})
    else:
        parts = np.array_split(np.arange(N_TRAIN), 5)
        for i, p in enumerate(parts, 1):
            _write(folder, f"data_batch_{i}", {"data": train_x[p].reshape(len(p), -1), "labels": train_y[p].tolist()})
        _write(folder, "test_batch", {"data": test_x.reshape(N_TEST, -1), "labels": test_y.tolist()})
        _write(folder, "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    archive_dir = base / "archive"
    archive_dir.mkdir()
    with tarfile.open(archive_dir / f"{folder.name.replace('-batches', '')}.tar.gz"
                      if dataset == "cifar100" else archive_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return {"train": (torch.from_numpy(train_x), torch.from_numpy(train_y)),
            "test": (torch.from_numpy(test_x), torch.from_numpy(test_y))}


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    base = tmp_path_factory.mktemp("c100")
    return base, _make_cifar(base, "cifar100", np.random.default_rng(0))


def _to_uint8(images):
    """Undo the normalisation: [B, 3, 32, 32] float -> uint8 pixels."""
    return (images.float().cpu() * STD + MEAN).mul(255).round().clamp(0, 255).to(torch.uint8)


def _source_ids(images):
    # The centre pixel is never padding (crops shift by 4 at most); channel 2 holds index + 1.
    return _to_uint8(images)[:, 2, 16, 16].long() - 1


def _recover_crops(out_u8, sources_u8):
    """(dy, dx, flip) for each output, by matching it against all 81 x 2 crops of its zero-padded source."""
    padded = F.pad(sources_u8, (4, 4, 4, 4))
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # [M, 3, 9, 9, 32, 32]
    found = []
    for flip in (False, True):
        target = out_u8.flip(-1) if flip else out_u8
        match = (windows == target[:, :, None, None]).all(-1).all(-1).all(1)  # [M, 9, 9]
        found.append(match)
    match = torch.stack(found, -1)  # [M, 9, 9, 2]
    assert (match.flatten(1).sum(1) == 1).all(), "each output must be exactly one padded crop of its source"
    m, dy, dx, fl = match.nonzero(as_tuple=True)
    return dy - 4, dx - 4, fl.bool()


def test_eval_batches_exact(cifar100):
    base, raw = cifar100
    train, test = cifar_loaders(base, batch_size=32, device="cpu", seed=27)
    assert len(test) == -(-N_TEST // 32) and len(train) == -(-N_TRAIN // 32)
    assert train.classes == [f"c{i}" for i in range(100)]
    images = torch.cat([x for x, _ in test])
    labels = torch.cat([y for _, y in test])
    assert images.shape == (N_TEST, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and torch.equal(labels, raw["test"][1])
    expected = (raw["test"][0].double() / 255 - MEAN.double()) / STD.double()
    assert_close(images, expected, torch.float32, "normalised test images")


@pytest.mark.parametrize("channels_last,dtype", [(True, torch.float32), (False, torch.bfloat16),
                                                 (True, torch.bfloat16)])
def test_layout_and_dtype_options(cifar100, channels_last, dtype):
    base, _ = cifar100
    ref, ref_test = cifar_loaders(base, batch_size=50, device="cpu", seed=3)
    alt, alt_test = cifar_loaders(base, batch_size=50, device="cpu", seed=3, channels_last=channels_last, dtype=dtype)
    for (x, y), (xa, ya) in zip(list(ref) + list(ref_test), list(alt) + list(alt_test), strict=True):
        assert xa.dtype == dtype and xa.shape == x.shape and torch.equal(y, ya)
        assert xa.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert_close(xa.float(), x.double(), dtype, "same batch in another format")


def test_train_augmentation_matches_torchvision_distribution(cifar100):
    from torchvision import transforms

    base, raw = cifar100
    images, labels = raw["train"]
    train, _ = cifar_loaders(base, batch_size=64, device="cpu", seed=27)
    outs, labs = [], []
    for _ in range(3):
        for x, y in train:
            outs.append(x)
            labs.append(y)
    out = torch.cat(outs)
    ids = _source_ids(out)
    assert torch.equal(torch.cat(labs), labels[ids]), "labels must follow their images"
    dy, dx, flip = _recover_crops(_to_uint8(out), images[ids])
    n = len(out)
    # Offsets uniform on -4..4 in y and x, flip with p = 0.5 (chi-square / binomial bounds far in the tails).
    for d in (dy, dx):
        counts = torch.bincount(d + 4, minlength=9).double()
        assert counts.min() > 0 and d.abs().max() <= 4
        chi2 = ((counts - n / 9) ** 2 / (n / 9)).sum()
        assert chi2 < 35, f"offsets not uniform: counts {counts.tolist()}"
    assert abs(flip.double().mean() - 0.5) < 4 * (0.25 / n) ** 0.5
    # Independence of y and x offsets: the joint table is close to the product of its margins.
    joint = torch.zeros(9, 9)
    joint.index_put_((dy + 4, dx + 4), torch.ones(n), accumulate=True)
    expected = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True) / n
    assert ((joint - expected) ** 2 / expected).sum() < 120, "y and x offsets look dependent"
    # Zero padding: outputs shifted by 4 have a border row or column of zeros in every channel.
    u8 = _to_uint8(out)
    shifted = (dy == -4)
    assert shifted.any() and (u8[shifted][:, :, 0, :] == 0).all()
    # torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip gives outputs of the same family.
    tv = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])
    tv_out = torch.stack([tv(images[i]) for i in ids[:200]])
    tdy, tdx, _ = _recover_crops(tv_out, images[ids[:200]])
    assert tdy.abs().max() <= 4 and len(torch.unique(tdy)) == 9 and len(torch.unique(tdx)) == 9


def test_order_is_seeded_and_resumable(cifar100):
    base, _ = cifar100

    def run(seed, epoch):
        train, _ = cifar_loaders(base, batch_size=50, device="cpu", seed=seed)
        train.set_epoch(epoch)
        return list(train)

    a, b = run(27, 0), run(27, 0)
    assert all(torch.equal(x, xb) and torch.equal(y, yb) for (x, y), (xb, yb) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], run(28, 0)[0][0])
    assert not torch.equal(a[0][0], run(27, 1)[0][0])
    # One pass advances the epoch; a loader resumed from a mid-epoch state yields exactly the rest.
    train, _ = cifar_loaders(base, batch_size=50, device="cpu", seed=27)
    first = list(train)
    assert train.epoch == 1 and all(torch.equal(x, xa) for (x, _), (xa, _) in zip(first, a, strict=True))
    it = iter(train)
    head = [next(it) for _ in range(2)]
    state = train.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    full = list(run(27, 1))
    resumed, _ = cifar_loaders(base, batch_size=50, device="cpu", seed=27)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full) == len(train)
    for (x, y), (xf, yf) in zip(head + tail, full, strict=True):
        assert torch.equal(x, xf) and torch.equal(y, yf)
    assert resumed.epoch == 2 and resumed.position == 0
    with pytest.raises(ValueError, match="batch_size"):
        cifar_loaders(base, batch_size=10, device="cpu")[0].load_state_dict(state)


def test_sharding_is_disjoint(cifar100):
    base, _ = cifar100
    world = 3
    loaders = [cifar_loaders(base, batch_size=16, device="cpu", seed=5, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        train_ids, test_ids = [], []
        for train, test in loaders:
            train.set_epoch(epoch)
            train_ids.append(torch.cat([_source_ids(x) for x, _ in train]))
            test_ids.append(torch.cat([_source_ids(x) for x, _ in test]))
        assert {len(t) for t in train_ids} == {N_TRAIN // world}
        all_train = torch.cat(train_ids)
        assert len(torch.unique(all_train)) == len(all_train) == (N_TRAIN // world) * world
        all_test = torch.cat(test_ids)
        assert torch.equal(torch.sort(all_test).values, torch.arange(N_TEST)), "test shards: disjoint and complete"
    assert len(loaders[0][0]) == -(-(N_TRAIN // world) // 16)


def test_archive_and_folder_and_cifar10(cifar100, tmp_path):
    base, _ = cifar100
    folder_train, folder_test = cifar_loaders(base, batch_size=64, device="cpu")
    tar_train, tar_test = cifar_loaders(base / "archive", batch_size=64, device="cpu")
    direct, _ = cifar_loaders(base / "archive" / "cifar-100-python.tar.gz", batch_size=64, device="cpu")
    for (x, y), (xt, yt), (xd, _) in zip(folder_train, tar_train, direct, strict=True):
        assert torch.equal(x, xt) and torch.equal(y, yt) and torch.equal(x, xd)
    raw = _make_cifar(tmp_path, "cifar10", np.random.default_rng(1))
    for root in (tmp_path, tmp_path / "archive"):
        train, test = cifar_loaders(root, dataset="cifar10", batch_size=100, device="cpu", drop_last=True)
        assert len(train) == N_TRAIN // 100 and train.classes == [f"c{i}" for i in range(10)]
        assert torch.equal(torch.cat([y for _, y in test]), raw["test"][1])
        batches = list(train)
        ids = torch.cat([_source_ids(x) for x, _ in batches])
        assert torch.equal(torch.cat([y for _, y in batches]), raw["train"][1][ids])


def test_missing_and_bad_input(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python.tar.gz.*download=True"):
        cifar_loaders(tmp_path, device="cpu")
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="cannot read the archive"):
        cifar_loaders(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="dataset"):
        cifar_loaders(tmp_path, dataset="cifar1000", device="cpu")
    x = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        CifarLoader(x.float(), torch.zeros(4), device="cpu")
    with pytest.raises(ValueError, match="rank"):
        CifarLoader(x, torch.zeros(4), device="cpu", rank=2, world_size=2)
    with pytest.raises(ValueError, match="dtype"):
        CifarLoader(x, torch.zeros(4), device="cpu", dtype=torch.int32)


def _small_cifar100(base, train):
    """A CIFAR-100 folder of 4 test images whose train file holds ``train`` (anything picklable)."""
    folder = base / "cifar-100-python"
    folder.mkdir(parents=True)
    _write(folder, "train", train)
    _write(folder, "test", {"data": np.zeros((4, 3072), np.uint8), "fine_labels": [0, 1, 2, 3]})
    _write(folder, "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return folder


GOOD = {"data": np.zeros((8, 3072), np.uint8), "fine_labels": list(range(8))}
BROKEN_BATCHES = {
    "no data": ({"fine_labels": [0] * 8}, r"no 'data' entry \(it has \['fine_labels'\]\)"),
    "no labels": ({"data": GOOD["data"]}, r"no 'fine_labels' entry"),
    "a list": ([GOOD["data"], GOOD["fine_labels"]], r"holds a pickled list, not a CIFAR python-version batch"),
    "zero images": ({"data": np.zeros((0, 3072), np.uint8), "fine_labels": []}, r"holds no image"),
    "wrong shape": ({**GOOD, "data": np.zeros((8, 1024), np.uint8)},
                    r"data is uint8 of shape \(8, 1024\), expected uint8 \[N, 3072\]"),
    "labels out of range": ({**GOOD, "fine_labels": [100] * 8},
                            r"labels in \[100, 100\]; expected 8 integers in \[0, 100\)"),
    "text data": ({**GOOD, "data": "pixels"}, r"data is <U6 of shape \(\)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_BATCHES))
def test_a_broken_batch_file_is_a_corrupt_dataset_error_naming_it(tmp_path, case):
    content, phrase = BROKEN_BATCHES[case]
    folder = _small_cifar100(tmp_path, content)
    with pytest.raises(CorruptDatasetError, match=re.escape(str(folder / "train")) + ": " + phrase):
        cifar_loaders(tmp_path, device="cpu")
    # The same file inside the archive: named as archive:member.
    archive = tmp_path / "archive" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    with pytest.raises(CorruptDatasetError, match=re.escape(f"{archive}:train") + ": " + phrase):
        cifar_loaders(archive.parent, device="cpu")


def test_an_archive_cut_in_half_is_a_corrupt_dataset_error_naming_it(tmp_path):
    folder = _small_cifar100(tmp_path / "src", GOOD)
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    whole = archive.read_bytes()
    assert len(cifar_loaders(tmp_path, device="cpu")[0].labels) == 8
    archive.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CorruptDatasetError, match=re.escape(str(archive)) + ": cannot read the archive"):
        cifar_loaders(tmp_path, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the split resident in GPU memory")
def test_cuda_matches_cpu(cifar100):
    base, _ = cifar100
    cpu, _ = cifar_loaders(base, batch_size=64, device="cpu", seed=9)
    gpu, _ = cifar_loaders(base, batch_size=64, device="cuda", seed=9)
    for (x, y), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(y, yg.cpu())
        assert_close(xg, x.double(), torch.float32, "same batch on the GPU")


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_batches_leave_the_thread_count_alone(cifar100, channels_last, monkeypatch):
    base, _ = cifar100
    train, test = cifar_loaders(base, batch_size=40, device="cpu", seed=5, channels_last=channels_last)

    def refuse(n):
        raise AssertionError(f"the loader called torch.set_num_threads({n}), a process-wide setting")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for loader, make in ((train, train._augment), (test, test._plain)):
        plan = [p for p in loader.epoch_plan(0) if p is not None]
        for k, (x, y) in enumerate(loader):
            # Built in chunks of CPU_CHUNK images: the same batch as one whole-batch gather.
            whole = make(*(p[k * 40 : (k + 1) * 40] for p in plan))
            assert torch.equal(x, whole) and x.is_contiguous(memory_format=fmt)
            assert torch.equal(y, loader.labels[plan[0][k * 40 : (k + 1) * 40]])
