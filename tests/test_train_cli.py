"""teskd-train as a user meets it: a folder of their own images, a timm model it cannot run, a run that failed
before its first checkpoint, and what a run's files and log look like (modes, progress bar, messages)."""

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from folders import small_jpeg_folder

from teskd_fast.train.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--epochs", "1", "--steps-per-epoch", "1", "--width", "0.0625", "--threads", "1",
        "--no-plot"]



def _umask_027():
    os.umask(0o027)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run on a folder of 40-64 px JPEGs with nothing but the dataset given (and the tiny sizes), its output
    a file (not a terminal), under umask 027."""
    tmp = tmp_path_factory.mktemp("folder-run")
    root = small_jpeg_folder(tmp / "f")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "teskd_fast.train", "--dataset", "folder", "--data-dir", str(root), "--batch-size",
           "4", "--loader", "torchvision", "--workers", "0", "--out", str(tmp / "run"), *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp, preexec_fn=_umask_027)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, tmp / "run"


def test_a_folder_of_small_images_trains_at_their_size_and_says_so(folder_run):
    done, run = folder_run
    start = next(line for line in done.stdout.splitlines() if line.startswith("teskd-train: training"))
    # The start-up line: dataset, image and class counts, image size, arch and width, epochs, batch, lr, precision.
    for phrase in ("on folder", "12 training images", "4 classes", "resnet18 (stem cifar, width 0.0625)",
                   "1 epochs", "global batch 4", "lr 0.1", "precision fp32"):
        assert phrase in start, (phrase, start)
    size = int(start.split("image size ")[1].split()[0].rstrip("|"))
    assert 40 <= size <= 64, start
    # The values taken from the data are said, before the start-up line.
    assert f"teskd-train: from the data: image size {size} (the median shorter side of 12 training images" \
        in done.stdout
    import yaml

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["image_size"], config["val_image_size"], config["threads"]) == (size, size, 1)
    # The results header names the dataset; with 4 classes top-5 (always 100%) is not printed.
    assert "(teskd, folder)" in done.stdout and "top-5" not in done.stdout


def test_run_files_follow_the_umask_and_a_log_gets_no_progress_bar(folder_run):
    done, run = folder_run
    for name in ("config.yaml", "last.pt", "best.pt", "summary.json", "teacher.json", "teacher.pt", "metrics.csv",
                 "metrics.jsonl"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o640, name
    # stdout and stderr are pipes: no tqdm bar (carriage returns), and no word about TensorBoard not asked for.
    assert "\r" not in done.stdout + done.stderr
    assert "tensorboard" not in (done.stdout + done.stderr).lower()


def test_top5_is_printed_from_6_classes(capsys):
    from teskd_fast.train.report import print_evaluation, print_summary

    final = {"top1_teacher": 50.0, "top5_teacher": 90.0}
    summary = {"method": "teskd", "preset": "none", "dataset": "cifar10", "final": final, "best_teacher_top1": 50.0,
               "best_epoch": 1, "epochs": 1}
    print_summary({**summary, "num_classes": 10}, "run")
    out = capsys.readouterr().out
    assert "top-5  90.00%" in out and "(teskd, cifar10)" in out
    print_summary({**summary, "num_classes": 5}, "run")
    assert "top-5" not in capsys.readouterr().out
    metrics = {"val_top1_teacher": 50.0, "val_top5_teacher": 100.0, "_val_images": 8}
    print_evaluation(metrics, "x.pt", "folder", 4)
    assert "top-5" not in capsys.readouterr().out


@pytest.mark.parametrize("arch, phrases", [
    # wrap()'s refusals: one line, exit 2, like any bad flag.
    ("timm/vit_tiny_patch16_224", ["--arch timm/vit_tiny_patch16_224:", "Plain ViTs"]),
    ("timm/levit_128s", ["--arch timm/levit_128s:", "TESKD needs 4"]),
    # Models that cannot run on the digits' 32 px: the size they need.
    pytest.param("timm/inception_v3", ["does not run on 32 px images", "made for 299 px", "--image-size 299"],
                 marks=pytest.mark.slow),
    ("timm/coat_lite_tiny", ["does not run on 32 px images", "takes 224 px images only", "--image-size 224"]),
])
def test_timm_models_that_cannot_run_are_refused_in_one_line_with_exit_2(arch, phrases, tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "run"
    assert main(["--arch", arch, "--out", str(out), "--device", "cpu", "--epochs", "1", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    # Refused before the run folder is made.
    assert not out.exists()


def test_a_run_that_failed_before_its_first_checkpoint_does_not_block_its_rerun(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # What a run that failed in its first step leaves: config.yaml and the metrics files, no last.pt.
    (out / "config.yaml").write_text("preset: digits-demo\n")
    (out / "metrics.jsonl").write_text("")
    (out / "metrics.csv").write_text("")
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint" in err and f"--out {out}" in err
    # The same command runs again in the folder.
    assert main(["--out", str(out), "--no-progress", "--no-tensorboard", *TINY]) == 0
    assert (out / "last.pt").is_file() and (out / "summary.json").is_file()


def test_eval_only_of_a_run_folder_evaluates_its_best_pt(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--no-progress", "--no-tensorboard", *TINY]) == 0
    capsys.readouterr()
    assert main(["--eval-only", str(out), "--device", "cpu", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert f"--eval-only {out}: a run folder: its best.pt" in captured.err and "Evaluation of" in captured.out
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--eval-only", str(empty)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "holds none of best.pt, last.pt, teacher.safetensors, teacher.pt" in err


def test_a_folder_run_of_a_timm_model_is_not_told_of_a_stem(tmp_path):
    # --stem applies to the torchvision ResNets only: a timm run on a folder must not print "from the data: stem".
    from teskd_fast.train.config import folder_defaults

    root = small_jpeg_folder(tmp_path / "f")
    for arch, said in (("resnet18", True), ("timm/convnext_atto", False)):
        values = {"dataset": "folder", "data_dir": str(root), "arch": arch, "image_size": 0, "val_image_size": 0,
                  "val_resize": 0}
        notes = folder_defaults(values, set())
        assert any(n.startswith("image size ") for n in notes), notes
        assert any(n.startswith("stem ") for n in notes) == said, (arch, notes)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_among_the_images_does_not_hang_the_measure_of_the_image_size(tmp_path):
    # The folder's image size is read from its images' headers before anything else: a FIFO named like an image
    # (no writer) must be skipped, not opened in a blocking read that hangs teskd-train before its first line.
    import threading

    from teskd_fast.train.config import _median_side

    root = small_jpeg_folder(tmp_path / "f")
    os.mkfifo(root / "train" / "a" / "0fifo.jpg")  # sorts first: among the images measured
    result = []
    worker = threading.Thread(target=lambda: result.append(_median_side(root / "train")), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the measure of the image size hangs on a named pipe"
    side, measured = result[0]
    assert measured == 12 and 40 <= side <= 64, result


def test_eval_only_of_a_resumed_runs_checkpoint(tmp_path, capsys):
    """A resumed run's last.pt records its --resume; --eval-only of it evaluates it (it was refused as a resume
    combined with --eval-only)."""
    out = tmp_path / "run"
    assert main(["--out", str(out), "--no-progress", "--no-tensorboard", *TINY]) == 0
    assert main(["--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["--eval-only", str(out / "last.pt"), "--device", "cpu", "--threads", "1"]) == 0
    assert "Evaluation of" in capsys.readouterr().out


def _entries(pattern, text):
    """{status: the entry's text} for each match of ``pattern`` (groups: status, text), whitespace collapsed."""
    return {int(m.group(1)): " ".join(m.group(2).split()) for m in re.finditer(pattern, text, re.S | re.M)}


def test_the_exit_status_table_is_the_one_the_docstrings_and_docs_give():
    """teskd-train's and teskd-compare's statuses: each docstring and docs table lists exactly the statuses of
    exit_status's table (and 128 + signal), each entry starting with the table's meaning."""
    from teskd_fast.train import cli, compare, exit_status

    root = Path(__file__).resolve().parents[1]
    train_doc = cli.__doc__.split("Exit status", 1)[1].split("\n\n", 2)[1]
    training_md = (root / "docs" / "training.md").read_text().split("## Exit status", 1)[1].split("\n## ", 1)[0]
    compare_doc = compare.__doc__.split("Exit status:", 1)[1].split("\n\n", 1)[0]
    comparing_md = (root / "docs" / "comparing.md").read_text().split("## Exit status", 1)[1].split("\n## ", 1)[0]
    sources = {
        "teskd-train's docstring": (exit_status.TRAIN, _entries(r"^- (\d+): (.*?)(?=^- |\Z)", train_doc + "\n"),
                                    train_doc),
        "docs/training.md": (exit_status.TRAIN, _entries(r"^\| (\d+) \| (.*?) \|$", training_md), training_md),
        "teskd-compare's docstring": (exit_status.COMPARE, _entries(r"(?:^|; )(\d+) (.*?)(?=; \d+ |\Z)",
                                                                    " ".join(compare_doc.split())), compare_doc),
        "docs/comparing.md": (exit_status.COMPARE, _entries(r"(?:^|; )(\d+) (.*?)(?=; \d+ |\Z)",
                                                            " ".join(comparing_md.split())), comparing_md),
    }
    for where, (table, entries, text) in sources.items():
        entries.pop(exit_status.SIGNAL_BASE, None)  # "128 + signal", checked below
        assert sorted(entries) == sorted(s.code for s in table.values()), (where, sorted(entries))
        for status in table.values():
            entry = entries[status.code]
            assert entry.lower().startswith(status.meaning.lower()), (where, status, entry)
        assert f"{exit_status.SIGNAL_BASE} + signal" in " ".join(text.split()), where
