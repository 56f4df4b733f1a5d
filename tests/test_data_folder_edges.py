"""Folder data at its edges: hidden entries, a named pipe, a PNG-only folder, images added after a scan.

Every reader of a folder (the index, teskd-scan, the torchvision, nvjpeg and DALI loaders) must agree on what is a
class and an image, and a scan's cache must neither hide files added since nor refuse files the loaders read.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from teskd_fast.data import BadImageError, CorruptDatasetError, DatasetNotFoundError, imagenet_loaders
from teskd_fast.data.folder import index_image_folder
from teskd_fast.data.nvjpeg import NvjpegImageLoader
from teskd_fast.data.scan import main as scan_main
from teskd_fast.data.scan import scan_image_folder

REPO = Path(__file__).resolve().parents[1]
# A reader that blocks (a FIFO opened for reading) fails the test instead of hanging the suite.
pytestmark = pytest.mark.timeout(120)

needs_dali = pytest.mark.skipif(
    importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None,
    reason="DALI is not installed (pip install -e '.[dali]')",
)
CLASSES = ["a", "b"]


def write_folder(root, fmt="JPEG", per_class=2, seed=0, size=12):
    """root/{train,val}/{a,b}/img_K.<ext>: small random images in ``fmt`` ("JPEG" or "PNG")."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ext = {"JPEG": "JPEG", "PNG": "png"}[fmt]
    for split in ("train", "val"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{k}.{ext}", format=fmt)
    return root


def _labels(loader):
    return sorted(int(v) for _, y in loader for v in y)


def _loader(root, backend, **kw):
    if backend == "nvjpeg":  # the nvjpeg backend's code, its decode call on the CPU
        index = index_image_folder(root / "train", formats=("JPEG",), **kw)
        return NvjpegImageLoader(index, decode_device="cpu", train=True, batch_size=4, image_size=8, device="cpu",
                                 workers=0)
    return imagenet_loaders(root, batch_size=4, backend=backend, image_size=8, val_resize=8, device="cpu",
                            workers=0, **kw)[0]


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "torchvision", "nvjpeg"])
def test_hidden_entries_are_neither_classes_nor_images_for_any_reader(tmp_path, backend):
    root = write_folder(tmp_path / "data")
    # Jupyter's empty checkpoint folders, a hidden file named like an image (macOS's ._ files are not images) and
    # a hidden folder inside a class, both holding bytes no decoder reads.
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
    (root / "train" / "a" / "._img_0.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "train" / "b" / ".cache").mkdir()
    (root / "train" / "b" / ".cache" / "thumb.JPEG").write_bytes(b"not an image")
    index = index_image_folder(root / "train")
    assert index.classes == CLASSES and len(index.samples) == 4
    assert all(not part.startswith(".") for rel, _ in index.samples for part in Path(rel).parts)
    # The scan sees the same two classes and four files per split, and finds nothing wrong.
    report = scan_image_folder(root, workers=1, write_cache=False)
    assert report.ok and report.num_files == 8, report.bad
    assert report.splits["train"]["classes"] == CLASSES
    # Each loader reads the four training images of the two classes (torchvision's own ImageFolder walk used to
    # count .ipynb_checkpoints as a class and stop the loader).
    assert _labels(_loader(root, backend)) == [0, 0, 1, 1]


def _fifo(root):
    path = root / "train" / "a" / "fifo.JPEG"
    os.mkfifo(path)
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "torchvision", "nvjpeg"])
def test_a_named_pipe_is_a_bad_file_not_a_hang(tmp_path, backend):
    root = write_folder(tmp_path / "data")
    fifo = _fifo(root)
    # No writer ever opens the pipe: a reader that opened it would block for good (the test's timeout fails it).
    with pytest.raises(BadImageError, match="named pipe") as info:
        _labels(_loader(root, backend, use_scan=False))
    assert str(fifo) in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_the_scanner_names_a_named_pipe_and_carries_on(tmp_path):
    root = write_folder(tmp_path / "data")
    fifo = _fifo(root)
    done = subprocess.run([sys.executable, "-m", "teskd_fast.data.scan", str(root), "--workers", "1"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1, done.stdout + done.stderr
    bad = [line for line in done.stdout.splitlines() if line.startswith("BAD ")]
    assert bad == [f"BAD {fifo}: cannot read the file (a named pipe (FIFO), not an image file)"]
    # The loaders, with the scan's cache, never open it.
    assert _labels(imagenet_loaders(root, batch_size=4, backend="torchvision", image_size=8, val_resize=8,
                                    device="cpu", workers=0)[0]) == [0, 0, 1, 1]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_teskd_train_stops_on_a_named_pipe_with_its_name(tmp_path):
    root = write_folder(tmp_path / "data", per_class=2)
    fifo = _fifo(root)
    command = [sys.executable, "-m", "teskd_fast.train", "--dataset", "folder", "--data-dir", str(root),
               "--loader", "torchvision", "--workers", "0", "--epochs", "1", "--batch-size", "8", "--image-size", "8",
               "--val-image-size", "8", "--val-resize", "8", "--width", "0.125", "--no-progress", "--no-plot",
               "--no-tensorboard", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert str(fifo) in done.stderr and "named pipe" in done.stderr and "Traceback" not in done.stderr


def test_a_png_folder_trains_after_its_scan_and_the_scan_says_how_to_accept_it(tmp_path, capsys):
    root = write_folder(tmp_path / "data", fmt="PNG")
    assert scan_main([str(root), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert len(bad) == 8 and all("PNG image, not JPEG" in line and "--allow-png" in line for line in bad)
    assert (root / "teskd_scan.json").is_file()
    # The cache the scan wrote does not make the loaders that read PNG refuse the folder.
    assert _labels(_loader(root, "torchvision")) == [0, 0, 1, 1]
    # The JPEG-only loader: nothing it can read, as the scan said.
    with pytest.raises(DatasetNotFoundError, match="no readable image .*reading JPEG"):
        _loader(root, "nvjpeg")
    # Accepted: exit 0; the PNG readers still read them, and nvjpeg refuses the format the scan accepted by name.
    assert scan_main([str(root), "--workers", "1", "--allow-png"]) == 0
    assert _labels(_loader(root, "torchvision")) == [0, 0, 1, 1]
    with pytest.raises(CorruptDatasetError, match="are PNG .*cannot decode .*--loader torchvision or dali"):
        _loader(root, "nvjpeg")


@pytest.mark.parametrize("change", ["added", "removed", "changed"])
def test_a_cache_older_than_the_folder_is_named_out_of_date(tmp_path, change):
    from PIL import Image

    root = write_folder(tmp_path / "data")
    assert scan_image_folder(root, workers=1).ok
    target = root / "train" / "b" / "img_1.JPEG"
    if change == "added":
        target = root / "train" / "b" / "new.JPEG"
        Image.new("RGB", (12, 12)).save(target, format="JPEG")
    elif change == "removed":
        target.unlink()
    else:
        Image.new("RGB", (20, 20)).save(target, format="JPEG")
    rel = "b/" + target.name
    with pytest.raises(CorruptDatasetError, match=f"out of date .*1 file\\(s\\) {change} \\(e.g. {rel}\\)"
                                                  ".*teskd-scan"):
        _loader(root, "torchvision")
    # A new scan brings the cache up to date.
    scan_image_folder(root, workers=1)
    assert len(_labels(_loader(root, "torchvision"))) == {"added": 5, "removed": 3, "changed": 4}[change]


def test_a_cache_of_the_former_format_asks_for_a_new_scan(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "teskd_scan.json").write_text(json.dumps({"format": "teskd-scan/1", "splits": {}}))
    with pytest.raises(CorruptDatasetError, match="another version of teskd-scan .*run teskd-scan again"):
        _loader(root, "torchvision")
