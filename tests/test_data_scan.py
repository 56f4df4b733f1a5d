"""Bad files: teskd-scan names exactly the bad ones, the loaders use its list, and stop with a clear message."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_imagenet import CLASSES, make_image_folder

from teskd_fast.data import BadImageError, DatasetNotFoundError, imagenet_loaders, scan_image_folder
from teskd_fast.data.folder import index_image_folder
from teskd_fast.data.nvjpeg import NvjpegImageLoader
from teskd_fast.data.scan import CacheNotWrittenWarning
from teskd_fast.data.scan import main as scan_main

REPO = Path(__file__).resolve().parents[1]

# A stuck loader (a worker that never answers) fails the test instead of hanging the suite.
pytestmark = pytest.mark.timeout(300)

# DALI is installed by .ci/run (the dali extra); the GPU image has none.
needs_dali = pytest.mark.skipif(
    importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None,
    reason="DALI is not installed (pip install -e '.[dali]')",
)


def _bad_files(root, rng):
    """Add a truncated JPEG, random bytes named .JPEG and a PNG named .JPEG to the training classes."""
    from PIL import Image

    good = sorted((root / "train" / CLASSES[0]).glob("img_*.JPEG"))[0].read_bytes()
    bad = {
        "truncated": root / "train" / CLASSES[0] / "truncated.JPEG",
        "random": root / "train" / CLASSES[1] / "random.JPEG",
        "png": root / "train" / CLASSES[2] / "png.JPEG",
    }
    bad["truncated"].write_bytes(good[: len(good) // 2])
    bad["random"].write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(bad["png"], format="PNG")
    return bad


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    rng = np.random.default_rng(7)
    root = make_image_folder(tmp_path_factory.mktemp("dirty"), rng, per_class=3)
    return root, _bad_files(root, rng)


def test_scan_names_exactly_the_bad_files(dirty, tmp_path, capsys):
    root, bad = dirty
    cache = tmp_path / "scan.json"
    report = scan_image_folder(root, workers=2, cache=cache)
    assert {p for p, _ in report.bad} == {str(p) for p in bad.values()}
    reasons = dict(report.bad)
    assert "PNG image, not JPEG" in reasons[str(bad["png"])]
    assert "truncated" in reasons[str(bad["truncated"])]
    assert "cannot decode" in reasons[str(bad["random"])]
    # Greyscale and CMYK JPEGs and scikit-learn's photos are good.
    n_good = sum(len(s["files"]) for s in report.splits.values())
    assert n_good == report.num_files - 3 == len(list(root.glob("*/*/*.JPEG"))) - 3
    written = json.loads(cache.read_text())
    assert {b["path"] for b in written["bad"]} == {str(p) for p in bad.values()}
    # The command: exit status 1, one line per bad file, nothing else flagged.
    assert scan_main([str(root), "--workers", "2", "--no-cache"]) == 1
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert sorted(line.split(":")[0][4:] for line in flagged) == sorted(str(p) for p in bad.values())


def test_console_script_on_a_clean_folder(tmp_path, capsys):
    root = make_image_folder(tmp_path / "clean", np.random.default_rng(3), per_class=2, splits=("val",))
    done = subprocess.run([sys.executable, "-m", "teskd_fast.data.scan", str(root / "val")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 bad" in done.stdout and (root / "val" / "teskd_scan.json").is_file()
    assert scan_main([str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "torchvision"])
def test_loaders_use_the_scan(dirty, tmp_path, backend):
    root, bad = dirty
    local = tmp_path / "data"
    shutil.copytree(root, local)
    report = scan_image_folder(local, workers=2)
    assert report.cache_path == local / "teskd_scan.json"
    train, _ = imagenet_loaders(local, batch_size=4, backend=backend, image_size=32, val_resize=32, device="cpu",
                                workers=1)
    assert train.index.from_scan == report.cache_path
    labels = [y for _, y in train]
    # The good JPEGs, and the PNG named .JPEG: flagged "not JPEG" by the default scan (for nvjpeg), but decodable
    # by these two loaders, which read it; the undecodable files are left out.
    png = f"{CLASSES[2]}/{bad['png'].name}"
    assert sum(len(y) for y in labels) == len(train.index.samples) == len(report.splits["train"]["files"]) + 1
    assert sorted(rel for rel, _ in train.index.samples) == sorted([rel for rel, _ in report.splits["train"]["files"]]
                                                                   + [png])


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=needs_dali), "torchvision"])
@pytest.mark.parametrize("kind", ["truncated", "random"])
def test_loader_without_scan_names_the_file(tmp_path, backend, kind):
    rng = np.random.default_rng(11)
    root = make_image_folder(tmp_path, rng, per_class=2)
    bad = _bad_files(root, rng)
    for other, path in bad.items():
        if other != kind:
            path.unlink()
    train, _ = imagenet_loaders(root, batch_size=4, backend=backend, image_size=32, val_resize=32, device="cpu",
                                workers=1)
    with pytest.raises(BadImageError) as info:
        for _ in train:
            pass
    message = str(info.value)
    assert str(bad[kind]) in message and "teskd-scan" in message
    assert "Traceback" not in message and info.value.__cause__ is None


def test_nvjpeg_path_rejects_png_named_jpeg(dirty):
    root, bad = dirty
    index = index_image_folder(root / "train", use_scan=False)
    loader = NvjpegImageLoader(index, decode_device="cpu", train=True, batch_size=8, image_size=32, device="cpu",
                               workers=0)
    with pytest.raises(BadImageError, match="teskd-scan") as info:
        for _ in loader:
            pass
    assert any(str(p) in str(info.value) for p in bad.values())


def _scan_command(*argv):
    """``teskd-scan ARGV`` in a fresh process, through the console script's entry point."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    entry = "import sys; from teskd_fast.data.scan import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", entry, *map(str, argv), "--workers", "1"], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO)


def _printed_bad(done):
    return sorted(line.split(":")[0][4:] for line in done.stdout.splitlines() if line.startswith("BAD "))


@pytest.mark.parametrize("clean", [True, False])
def test_a_cache_that_cannot_be_written_is_a_warning_and_the_findings_stand(dirty, tmp_path, clean):
    root, bad = dirty
    if clean:
        root = make_image_folder(tmp_path / "clean", np.random.default_rng(3), per_class=1, splits=("val",))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "scan.json"
    done = _scan_command(root, "--cache", cache)
    # The status the findings give (0 clean, 1 bad files), the bad files printed, a warning naming the path.
    assert done.returncode == (0 if clean else 1), done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert _printed_bad(done) == ([] if clean else sorted(str(p) for p in bad.values()))
    warning = done.stderr.strip()
    assert warning.startswith(f"teskd-scan: warning: cannot write the scan cache {cache}") and "--cache PATH" in warning
    assert "written to" not in done.stdout and blocker.read_text() == ""
    # The library: the same reason in the report, as a CacheNotWrittenWarning.
    with pytest.warns(CacheNotWrittenWarning, match=re.escape(str(cache))):
        report = scan_image_folder(root, workers=1, cache=cache)
    assert report.cache_path is None and str(cache) in report.cache_error and report.ok == clean


def test_a_read_only_dataset_is_scanned_and_reported(dirty, tmp_path, lock_folder):
    root, bad = dirty
    local = tmp_path / "data"
    shutil.copytree(root, local)
    lock_folder(local)
    done = _scan_command(local)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert len(_printed_bad(done)) == len(bad)
    assert f"cannot write the scan cache {local / 'teskd_scan.json'}" in done.stderr and "--cache PATH" in done.stderr
    assert sorted(p.name for p in local.iterdir()) == ["train", "val"]


def test_a_class_folder_without_a_good_image_is_a_finding_the_loaders_agree_with(tmp_path):
    root = make_image_folder(tmp_path / "data", np.random.default_rng(5), per_class=1)
    empty = root / "train" / "n04_empty"
    empty.mkdir()
    # A class whose only file is bad has no good image either.
    spoilt = root / "val" / CLASSES[2]
    for path in spoilt.iterdir():
        path.write_bytes(b"not a JPEG")
    done = _scan_command(root)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("EMPTY ")]
    assert len(lines) == 2, done.stdout
    assert lines[0].startswith(f"EMPTY {empty}: class folder with no image file") and "loaders refuse it" in lines[0]
    assert lines[1].startswith(f"EMPTY {spoilt}: class folder with no good image (its 1 file(s) are bad)")
    report = scan_image_folder(root, workers=1, write_cache=False)
    assert not report.ok and [p for p, _ in report.empty_classes] == [str(empty), str(spoilt)]
    # The loaders refuse the same folders, with the scan's cache (written by the command) or without it.
    for use_scan, phrase in ((True, "has no readable image"), (False, "holds no image file")):
        with pytest.raises(DatasetNotFoundError, match=re.escape(str(empty)) + ".* " + phrase):
            imagenet_loaders(root, batch_size=2, backend="torchvision", device="cpu", workers=0, use_scan=use_scan)
    empty.rmdir()
    assert [p for p, _ in scan_image_folder(root, workers=1).empty_classes] == [str(spoilt)]
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(spoilt)) + " has no readable image"):
        imagenet_loaders(root, batch_size=2, backend="torchvision", device="cpu", workers=0)


def test_a_class_folder_of_png_images_is_said_to_be_readable_by_torchvision_and_dali(tmp_path):
    # The EMPTY line of a class whose images all decode, as PNG, must not say "the loaders refuse it": only nvjpeg
    # does, and the torchvision loader trains on it after the scan as before.
    from PIL import Image

    root = make_image_folder(tmp_path / "data", np.random.default_rng(7), per_class=1)
    pngs = root / "val" / CLASSES[2]
    for path in list(pngs.iterdir()):
        Image.open(path).convert("RGB").save(path.with_suffix(".png"), format="PNG")
        path.unlink()
    report = scan_image_folder(root, workers=1)
    assert [p for p, _ in report.empty_classes] == [str(pngs)]
    reason = report.empty_classes[0][1]
    assert "loaders refuse it" not in reason, reason
    assert "PNG images" in reason and "the torchvision and DALI loaders read them" in reason, reason
    assert "nvjpeg loader refuses the folder" in reason and "--allow-png" in reason, reason
    _, val = imagenet_loaders(root, batch_size=2, backend="torchvision", device="cpu", workers=0)
    assert sum(len(y) for _, y in val) == sum(1 for d in (root / "val").iterdir() for _ in d.iterdir())
