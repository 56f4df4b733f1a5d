"""Folder links in an ImageFolder tree: each image counted once, a loop refused naming it; one line per scan entry."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_imagenet import CLASSES, make_image_folder

from teskd_fast.data import CorruptDatasetError, DatasetNotFoundError, imagenet_loaders, scan_image_folder
from teskd_fast.data.folder import index_image_folder, list_images
from teskd_fast.data.scan import escape
from teskd_fast.data.scan import main as scan_main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="folder links need POSIX symlinks")


@pytest.fixture
def root(tmp_path):
    return make_image_folder(tmp_path / "data", np.random.default_rng(3), per_class=2)


def _count(root, split="train"):
    return {c: len(list((root / split / c).glob("*.JPEG"))) for c in CLASSES}


def test_a_link_to_another_folder_is_followed_once(root, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    for i, src in enumerate(sorted((root / "train" / CLASSES[1]).glob("*.JPEG"))):
        (extra / f"more_{i}.JPEG").write_bytes(src.read_bytes())
    (root / "train" / CLASSES[0] / "more").symlink_to(extra, target_is_directory=True)
    files = list_images(root / "train" / CLASSES[0])
    assert len(files) == len(set(files)) == _count(root)[CLASSES[0]] + len(list(extra.iterdir()))
    assert sum(f.startswith("more/") for f in files) == len(list(extra.iterdir()))


@pytest.mark.parametrize("kind", ["loop", "second-link"])
def test_a_folder_reached_twice_is_refused_by_the_index_and_the_scanner(root, kind, capsys):
    class_dir = root / "train" / CLASSES[0]
    if kind == "loop":
        link = class_dir / "sub"
        link.symlink_to(".", target_is_directory=True)  # train/a/sub -> . : every image again, without end
    else:
        (class_dir / "x").mkdir()
        link = class_dir / "y"
        link.symlink_to("x", target_is_directory=True)
    with pytest.raises(CorruptDatasetError, match="listed twice") as info:
        index_image_folder(root / "train", use_scan=False)
    assert str(link) in str(info.value)
    assert ("link loop" in str(info.value)) == (kind == "loop")
    # The scanner refuses it too (nothing scanned, exit 2), naming the link, and writes no cache.
    assert scan_main([str(root), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert str(link) in err and "listed twice" in err
    assert not (root / "teskd_scan.json").exists()
    # And so do the loaders.
    with pytest.raises(CorruptDatasetError, match="listed twice"):
        imagenet_loaders(root, batch_size=2, backend="torchvision", image_size=32, val_resize=36)


def test_teskd_train_refuses_a_link_loop_with_exit_1(root, tmp_path):
    (root / "train" / CLASSES[2] / "again").symlink_to("..", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "teskd_fast.train", "--preset", "imagenet-resnet18", "--data-dir", str(root),
           "--loader", "torchvision", "--workers", "0", "--device", "cpu", "--epochs", "1", "--width", "0.0625",
           "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("teskd-train: ") and "listed twice" in last and "again" in last, done.stderr
    assert not (tmp_path / "run").exists()


def test_a_root_that_is_a_link_loop_is_exit_2(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert scan_main([str(loop)]) == 2
    err = capsys.readouterr().err
    assert "teskd-scan: error:" in err and "link loop" in err and "Traceback" not in err
    with pytest.raises(DatasetNotFoundError, match="link loop"):
        index_image_folder(loop / "train")


def test_a_file_name_with_a_newline_prints_on_one_line(root, capsys):
    crafted = root / "train" / CLASSES[0] / "x.JPEG\nEMPTY fake: no good image.JPEG"  # no "/" in a name
    crafted.write_bytes(b"not a jpeg")
    report = scan_image_folder(root, workers=1, write_cache=False)
    assert [p for p, _ in report.bad] == [str(crafted)]
    assert scan_main([str(root), "--workers", "1", "--no-cache"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["BAD", "teskd-scan:"], lines
    assert lines[0].startswith(f"BAD {escape(crafted)}: ") and "\\nEMPTY " in lines[0]


def test_escape_keeps_printable_text_and_is_unambiguous():
    assert escape("n01440764/é 1.JPEG") == "n01440764/é 1.JPEG"
    assert escape("a\nb\tc\\d\x00\x7f\u2028") == "a\\nb\\tc\\\\d\\x00\\x7f\\u2028"
    assert escape("a\\nb") != escape("a\nb")
