"""teskd-train refusing what it cannot use: its message and exit status, no traceback, no stray run folder.

Each case runs the real command in a fresh process (``python -m teskd_fast.train``) and reads its stderr:
a missing or broken dataset (exit 1, the data package's message naming the path), an image that only fails when
its batch is decoded during training (exit 1, last.pt of the finished epoch kept), a checkpoint of the wrong kind
for --eval-only (exit 1), a loader this machine cannot run or a run folder that cannot be written (exit 2).
"""

import importlib.util
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from teskd_fast.data.common import epoch_order
from teskd_fast.data.folder import index_image_folder
from teskd_fast.models.resnet import build_resnet

# A stuck loader (a worker that never answers) fails the test instead of hanging the suite.
pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--device", "cpu", "--epochs", "1", "--width", "0.0625", "--no-progress", "--no-tensorboard", "--no-plot",
         "--threads", "1"]
# --eval-only takes the network from the checkpoint (or the demo's for a bare state_dict).
EVAL_FLAGS = ["--device", "cpu", "--no-progress", "--threads", "1"]
# ImageNet flags for a tiny folder of 40x40 JPEGs.
SMALL_IMAGES = ["--batch-size", "2", "--image-size", "32", "--val-image-size", "32", "--val-resize", "32"]

needs_dali = pytest.mark.skipif(
    importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None,
    reason="DALI is not installed (pip install -e '.[dali]')",
)


def _command(argv, tmp_path, flags=FLAGS):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "teskd_fast.train", *argv, *flags]
    if "--out" not in argv:
        cmd += ["--out", str(tmp_path / "run")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def _refused(done, status, *phrases):
    """The command exited with ``status``, its last line a message holding every phrase, and no traceback.

    (Only DALI's own log line about the file it could not decode may come before the message.)
    """
    assert done.returncode == status, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("teskd-train: "), done.stderr
    for phrase in phrases:
        assert phrase in message, (phrase, done.stderr)


def _image_folder(root, empty_class=None, per_class=2):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            folder = root / split / c
            folder.mkdir(parents=True)
            if split == "train" and c == empty_class:
                continue
            for i in range(per_class if split == "train" else 2):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{c}_{i}.JPEG")
    return root


def _cifar100_folder(root, skip=None, garble=None, train=None):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 8), ("test", 4)):
        if name == skip:
            continue
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": [0] * n}
        if name == "train" and train is not None:
            batch = train
        (folder / name).write_bytes(b"not a pickle" if name == garble else pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return folder


def _cifar100_archive_cut_in_half(root):
    folder = _cifar100_folder(root / "src")
    archive = root / "cifar-100-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    whole = archive.read_bytes()
    archive.write_bytes(whole[: len(whole) // 2])
    return archive


def _setup(case, tmp_path):
    """(argv, the path the message must name, a phrase of the message) for one broken dataset."""
    cifar = ["--preset", "cifar100-resnet18", "--data-dir"]
    if case == "imagenet-missing-root":
        root = tmp_path / "no-imagenet"
        return ["--preset", "imagenet-resnet18", "--data-dir", str(root)], root, "image-net.org"
    if case == "imagenet-empty-class-folder":
        root = _image_folder(tmp_path / "imagenet", empty_class="n02")
        argv = ["--preset", "imagenet-resnet18", "--data-dir", str(root), "--loader", "torchvision", "--workers", "0",
                *SMALL_IMAGES]
        return argv, root / "train" / "n02", "holds no image file"
    if case == "cifar-missing-root":
        root = tmp_path / "no-cifar"
        return [*cifar, str(root)], root / "cifar-100-python", "download"
    if case == "cifar-missing-file":
        folder = _cifar100_folder(tmp_path / "cifar", skip="train")
        return [*cifar, str(folder.parent)], folder / "train", "is missing"
    if case == "cifar-corrupt-file":
        folder = _cifar100_folder(tmp_path / "cifar", garble="train")
        return [*cifar, str(folder.parent)], folder / "train", "not a CIFAR python-version batch file"
    if case == "cifar-archive-cut-in-half":
        archive = _cifar100_archive_cut_in_half(tmp_path / "cifar")
        return [*cifar, str(archive.parent)], archive, "cannot read the archive"
    if case == "cifar-file-without-data":
        folder = _cifar100_folder(tmp_path / "cifar", train={"fine_labels": [0] * 8})
        return [*cifar, str(folder.parent)], folder / "train", "no 'data' entry"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["imagenet-missing-root", "imagenet-empty-class-folder", "cifar-missing-root",
                                  *[pytest.param(c, marks=pytest.mark.slow) for c in (
                                      "cifar-missing-file", "cifar-archive-cut-in-half", "cifar-file-without-data",
                                      "cifar-corrupt-file")]])
def test_dataset_errors_give_the_message_and_exit_status_1(case, tmp_path):
    argv, path, phrase = _setup(case, tmp_path)
    done = _command(argv, tmp_path)
    _refused(done, 1, str(path), phrase)
    assert not (tmp_path / "run").exists(), "a run that never started left its run folder"


def _truncate_in_second_epoch(root, seed, batch, prefetched):
    """Cut a training JPEG in half that the first epoch's ``prefetched`` batches do not read, the second's first does.

    The epoch order is the loaders' (``epoch_order`` over the sorted folder index): the first epoch reads at most
    its first ``prefetched`` batches; the second epoch's first batch meets the cut file.

    Returns:
        the cut file's path.
    """
    index = index_image_folder(root / "train", use_scan=False)
    n = len(index.samples)
    first, _ = epoch_order(n, shuffle=True, seed=seed, epoch=0, equal_shards=True)
    second, _ = epoch_order(n, shuffle=True, seed=seed, epoch=1, equal_shards=True)
    unread = set(first[prefetched * batch :].tolist()) & set(second[:batch].tolist())
    if not unread:
        return None
    path = Path(index.path(min(unread)))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


@pytest.mark.parametrize("loader,workers", [("torchvision", 0), pytest.param("torchvision", 1, marks=pytest.mark.slow),
                                            pytest.param("dali", 1, marks=[needs_dali, pytest.mark.slow])])
def test_a_truncated_jpeg_met_in_training_stops_with_its_name_and_keeps_last_pt(tmp_path, loader, workers):
    from PIL import Image

    root = _image_folder(tmp_path / "imagenet", per_class=8)
    # Batches the first epoch may read: its one step, the next batch (fetched before the loop sees the step cap),
    # and what is read ahead: DALI's prefetch queue (2) or the DataLoader's (4 per worker process).
    prefetched = 2 + (4 * workers if loader == "torchvision" else 2)
    seed, bad = next((s, p) for s in range(100) if (p := _truncate_in_second_epoch(root, s, 2, prefetched)))
    # The cut file passes the cheap check (a JPEG header), so only decoding its batch reveals it.
    with Image.open(bad) as img:
        assert img.format == "JPEG"
    argv = ["--preset", "imagenet-resnet18", "--data-dir", str(root), "--loader", loader, "--workers", str(workers),
            *SMALL_IMAGES, "--seed", str(seed), "--steps-per-epoch", "1"]
    done = _command(argv, tmp_path, [*FLAGS, "--epochs", "2"])
    run = tmp_path / "run"
    _refused(done, 1, f"cannot decode {bad}", "teskd-scan", f"{run / 'last.pt'} holds the last saved state")
    assert len(re.findall(r"^teskd-train: cannot decode", done.stderr, re.M)) == 1, done.stderr
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    assert (ckpt["epoch"], ckpt["position"], ckpt["step"]) == (1, 0, 1)
    assert not list(run.glob("*.tmp")) and not (run / "teacher.pt").exists()


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
def test_loader_nvjpeg_without_cuda_is_a_configuration_error(tmp_path):
    root = _image_folder(tmp_path / "imagenet")
    argv = ["--preset", "imagenet-resnet18", "--data-dir", str(root), "--loader", "nvjpeg", *SMALL_IMAGES]
    done = _command(argv, tmp_path)
    _refused(done, 2, "--loader nvjpeg", "CUDA", "--loader torchvision", "--loader dali")
    assert not (tmp_path / "run").exists()
    if not torch.cuda.is_available():
        # The default device on a machine without CUDA is the CPU: refused the same way.
        done = _command(argv, tmp_path, [f for f in FLAGS if f not in ("--device", "cpu")])
        _refused(done, 2, "--loader nvjpeg", "no CUDA device", "--loader torchvision")


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
def test_an_out_folder_under_a_regular_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker / "run", blocker):
        done = _command(["--out", str(out)], tmp_path)
        _refused(done, 2, f"--out {out}", f"{blocker} is not a folder")
        assert "training" not in done.stdout
    assert blocker.read_text() == "not a folder"


def test_an_out_folder_in_a_read_only_folder_is_refused_before_any_work(tmp_path, lock_folder):
    locked = tmp_path / "locked"
    locked.mkdir()
    lock_folder(locked)
    done = _command(["--out", str(locked / "run")], tmp_path)
    _refused(done, 2, f"--out {locked / 'run'}", f"{locked} is not writable")
    assert not list(locked.iterdir())


def _teacher_state_dict(arch, width):
    return build_resnet(arch, 10, "cifar", width).state_dict()


@pytest.mark.parametrize("content,holds", [
    ({"epoch": 3, "weights": [1.0]}, "a dict with keys ['epoch', 'weights']"),
    pytest.param([1, 2, 3], "a list of 3 items", marks=pytest.mark.slow),
    pytest.param(torch.zeros(3, 4), "a tensor of shape (3, 4)", marks=pytest.mark.slow),
])
def test_eval_only_of_a_file_of_another_kind_says_what_it_expected(tmp_path, content, holds):
    path = tmp_path / "x.pt"
    torch.save(content, path)
    before = sorted(tmp_path.iterdir())
    done = _command(["--eval-only", str(path)], tmp_path, EVAL_FLAGS)
    _refused(done, 1, f"--eval-only {path}", "expected a teskd-train checkpoint", "or a teacher.pt state_dict",
             f"the file holds {holds}")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("arch,width,phrases", [
    # The demo's teacher is a quarter-width ResNet-18; a ResNet-34's has more blocks, a narrower one other shapes.
    pytest.param("resnet34", 0.25, ["96 unexpected key(s) ['layer1.2.bn1.bias'", "(96 in all)"],
                 marks=pytest.mark.slow),
    ("resnet18", 0.125, ["shapes do not fit", "conv1.weight: (8, 3, 3, 3) given, (16, 3, 3, 3) expected"]),
])
def test_eval_only_of_a_state_dict_of_another_network_names_the_mismatch_briefly(tmp_path, arch, width, phrases):
    path = tmp_path / "teacher.pt"
    torch.save(_teacher_state_dict(arch, width), path)
    done = _command(["--eval-only", str(path)], tmp_path, EVAL_FLAGS)
    _refused(done, 1, f"--eval-only {path}", "the resnet18 teacher (--stem cifar, --width 0.25, 10 classes)",
             *phrases)
    # The first few keys, not the whole list.
    assert len(done.stderr) < 1200 and done.stderr.count("\n") == 1, done.stderr
    if arch == "resnet34":
        # The state_dict that fits is evaluated.
        torch.save(_teacher_state_dict("resnet18", 0.25), path)
        done = _command(["--eval-only", str(path)], tmp_path, EVAL_FLAGS)
        assert done.returncode == 0 and "Evaluation of" in done.stdout, done.stderr


def test_eval_only_mismatch_for_a_timm_arch_names_no_resnet_flags(tmp_path, capsys):
    # --stem and --width do not shape a timm model: the message names the network by --arch alone.
    pytest.importorskip("timm", reason="timm is optional: pip install timm")
    from teskd_fast.train.cli import main

    path = tmp_path / "teacher.pt"
    torch.save(_teacher_state_dict("resnet18", 0.25), path)
    assert main(["--eval-only", str(path), "--arch", "timm/test_convnext", *EVAL_FLAGS]) == 1
    err = capsys.readouterr().err
    assert "the timm/test_convnext teacher (10 classes)" in err and "or --arch, say which network" in err
    assert "--stem" not in err and "--width" not in err and "Traceback" not in err
