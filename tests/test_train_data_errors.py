"""teskd-train with a dataset that is missing or broken: the data package's message and exit status 1, no traceback.

Each case runs the real command in a fresh process (``python -m teskd_fast.train``) and reads its stderr.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--device", "cpu", "--epochs", "1", "--width", "0.0625", "--no-progress", "--no-tensorboard", "--no-plot"]


def _command(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "teskd_fast.train", *argv, *FLAGS, "--out", str(tmp_path / "run")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def _image_folder(root, empty_class=None):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("n01", "n02"):
            folder = root / split / c
            folder.mkdir(parents=True)
            if split == "train" and c == empty_class:
                continue
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{c}_{i}.JPEG")
    return root


def _cifar100_folder(root, skip=None, garble=None):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", 8), ("test", 4)):
        if name == skip:
            continue
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": [0] * n}
        (folder / name).write_bytes(b"not a pickle" if name == garble else pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return folder


def _setup(case, tmp_path):
    """(argv, the path the message must name, a phrase of the message) for one broken dataset."""
    if case == "imagenet-missing-root":
        root = tmp_path / "no-imagenet"
        return ["--preset", "imagenet-resnet18", "--data-dir", str(root)], root, "image-net.org"
    if case == "imagenet-empty-class-folder":
        root = _image_folder(tmp_path / "imagenet", empty_class="n02")
        argv = ["--preset", "imagenet-resnet18", "--data-dir", str(root), "--loader", "torchvision", "--workers", "0",
                "--batch-size", "2", "--image-size", "32", "--val-image-size", "32", "--val-resize", "32"]
        return argv, root / "train" / "n02", "holds no image file"
    if case == "cifar-missing-root":
        root = tmp_path / "no-cifar"
        return ["--preset", "cifar100-resnet18", "--data-dir", str(root)], root / "cifar-100-python", "download"
    if case == "cifar-missing-file":
        folder = _cifar100_folder(tmp_path / "cifar", skip="train")
        return ["--preset", "cifar100-resnet18", "--data-dir", str(folder.parent)], folder / "train", "is missing"
    if case == "cifar-corrupt-file":
        folder = _cifar100_folder(tmp_path / "cifar", garble="train")
        argv = ["--preset", "cifar100-resnet18", "--data-dir", str(folder.parent)]
        return argv, folder / "train", "not a CIFAR python-version batch file"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["imagenet-missing-root", "imagenet-empty-class-folder", "cifar-missing-root",
                                  "cifar-missing-file", "cifar-corrupt-file"])
def test_dataset_errors_give_the_message_and_exit_status_1(case, tmp_path):
    argv, path, phrase = _setup(case, tmp_path)
    done = _command(argv, tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("teskd-train: "), done.stderr
    assert str(path) in done.stderr and phrase in done.stderr, done.stderr
