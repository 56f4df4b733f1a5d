"""teskd-train's run folder through the real command: one run at a time, a resume continues the same run, the
metrics hold one row per finished epoch after any kill, and temporary files of killed writes are removed."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_train_run import FAST, _sigterm_at

from teskd_fast.train.checkpoint import load_checkpoint
from teskd_fast.train.cli import main
from teskd_fast.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# Files a refused command must leave as they were (the lock file aside, which any command may create).
LOCK = ".lock"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the run folder's lock needs fcntl")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "teskd_fast.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _wait(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    """Exit status and everything printed (stdout, then stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out + err


def _train(*args: str) -> tuple[int, str]:
    return _wait(_start(*args))


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a run folder; checkpoints are hard links (every write replaces them by a rename)."""
    def link_or_copy(s, d):
        if s.endswith(".pt"):
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK), copy_function=link_or_copy)
    return dst


def _replace(path: Path, src: Path) -> None:
    # Unlink first: writing through a hard link would change the fixture's file too.
    path.unlink()
    shutil.copyfile(src, path)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.name != LOCK}


def _epochs(run: Path) -> list[int]:
    return [r["epoch"] for r in read_metrics(run)]


def _csv_epochs(run: Path) -> list[int]:
    lines = (run / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("epoch")
    return [int(line.split(",")[col]) for line in lines[1:]]


def _started(proc: subprocess.Popen) -> str:
    """Read the command's output up to its 'training' / 'resuming' line: it then holds the folder's lock."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(("teskd-train: training", "teskd-train: resuming")):
            return "".join(seen)
    raise AssertionError(f"the run did not start: {''.join(seen)}{proc.stderr.read()}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run folders made once: a finished 2-epoch run, a run stopped inside epoch 2, a baseline run."""
    root = tmp_path_factory.mktemp("runs")
    folders = {name: root / name for name in ("finished", "mid_epoch", "baseline")}
    assert main(["--epochs", "2", "--out", str(folders["finished"])] + FAST) == 0
    with pytest.MonkeyPatch.context() as m:
        # SIGTERM after global step 5: batch 2 of epoch 2 (3 steps per epoch).
        _sigterm_at(m, 5)
        assert main(["--epochs", "3", "--out", str(folders["mid_epoch"])] + FAST) == 128 + signal.SIGTERM
    assert load_checkpoint(folders["mid_epoch"] / "last.pt")["position"] == 2
    assert main(["--method", "baseline", "--epochs", "1", "--out", str(folders["baseline"])] + FAST) == 0
    return folders


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
def test_resume_refuses_another_runs_checkpoint_and_changed_fields(runs, tmp_path, capsys):
    # Through the command: (run folder to copy, flags after --resume FOLDER, what the message must say).
    cases = {
        "model": ("finished", ["--arch", "resnet34", "--width", "0.5"],
                  ["arch 'resnet18' -> 'resnet34'", "width 0.25 -> 0.5", "--epochs"]),
        "mid_epoch": ("mid_epoch", ["--batch-size", "32", "--seed", "1"], ["batch_size 64 -> 32", "seed 27 -> 1"]),
        "foreign": ("finished", [], ["config.yaml", "last.pt", "method 'teskd' -> 'baseline'"]),
    }
    (tmp_path / "lr.yaml").write_text("lr: 0.1\n")
    # The same path in this process (the cases differ in the check only).
    in_process = {
        "yaml": ("finished", ["--config", str(tmp_path / "lr.yaml")], ["lr 0.05 -> 0.1"]),
        "fewer_epochs": ("finished", ["--epochs", "1"], ["--epochs 1", "finished 2 epochs", "--epochs 2"]),
        "mid_epoch_epochs": ("mid_epoch", ["--epochs", "1"], ["--epochs 1", "inside epoch 2", "--epochs 2"]),
        "out": ("finished", ["--out", str(tmp_path / "elsewhere")], ["--out", "drop --out"]),
    }
    folders = {name: _copy(runs[src], tmp_path / name) for name, (src, _, _) in {**cases, **in_process}.items()}
    # A last.pt copied from another run (the baseline, 1 epoch) into a TESKD run folder.
    _replace(folders["foreign"] / "last.pt", runs["baseline"] / "last.pt")
    before = {name: _snapshot(folder) for name, folder in folders.items()}
    procs = {name: _start("--resume", str(folders[name]), *flags) for name, (_, flags, _) in cases.items()}
    results = {}
    for name, (_, flags, _) in in_process.items():
        with pytest.raises(SystemExit) as e:
            main(["--resume", str(folders[name]), *flags])
        captured = capsys.readouterr()
        results[name] = e.value.code, captured.out + captured.err
    results.update({name: _wait(proc) for name, proc in procs.items()})
    for name, (_, _, expected) in {**cases, **in_process}.items():
        status, printed = results[name]
        assert status == 2, (name, printed)
        assert "Traceback" not in printed and "usage:" not in printed, (name, printed)
        assert str(folders[name]) in printed, (name, printed)
        for text in expected:
            assert text in printed, (name, text, printed)
        # Refused before any work: nothing trained, nothing in the folder changed.
        assert "teskd-train: resuming" not in printed, name
        assert _snapshot(folders[name]) == before[name], name


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
def test_resume_accepts_the_changeable_flags_and_removes_stale_temporaries(runs, tmp_path):
    run = _copy(runs["finished"], tmp_path / "run")
    stale = [run / name for name in (".last.pt.k2j3x9ab.tmp", ".best.pt.0q1w2e3r.tmp", ".teacher.pt.zz81hq0a.tmp",
                                     ".config.yaml.p0o9i8u7.tmp")]
    kept = {run / name: name.encode() for name in (".notes.tmp", "last.pt.tmp", ".last.pt.bak", "notes.txt")}
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    for path, content in kept.items():
        path.write_bytes(content)
    # Every flag a resume may change, changed; --epochs 3 extends the 2-epoch run by one epoch.
    status, printed = _train("--resume", str(run), "--epochs", "3", "--workers", "2", "--threads", "1",
                             "--log-every", "1", "--no-compile", "--no-channels-last", "--report-after", "0.5",
                             "--device", "cpu", "--data-dir", str(tmp_path), "--download", "--no-progress",
                             "--no-tensorboard", "--no-plot", "--compile-mode", "reduce-overhead")
    assert status == 0, printed
    assert "Traceback" not in printed and "warning" not in printed
    assert _epochs(run) == [1, 2, 3]
    for path in stale:
        assert not path.exists(), path
        assert f"removed {path}" in printed
    for path, content in kept.items():
        assert path.read_bytes() == content, path
    cfg = load_checkpoint(run / "last.pt")["config"]
    assert (cfg["epochs"], cfg["report_after"], cfg["log_every"], cfg["workers"]) == (3, 0.5, 1, 2)


def test_a_row_lost_between_checkpoint_and_log_comes_back_from_the_checkpoint(runs, tmp_path):
    run = _copy(runs["finished"], tmp_path / "run")
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    # What a SIGKILL right after last.pt of epoch 2 was renamed into place, before its row was logged, leaves:
    # epoch 1's row only. A row past the checkpoint and a line cut short by a killed append come along too.
    jsonl = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(jsonl[0] + '{"epoch": 3, "val_top1_teacher": -1.0}\n{"epoch": 4, "tr')
    csv_lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(csv_lines[:2]))
    assert main(["--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    after = read_metrics(run)
    assert [r["epoch"] for r in after] == [1, 2, 3] and _csv_epochs(run) == [1, 2, 3]
    # Rows 1 and 2 are the ones the first run computed (timing included: they come from its checkpoint).
    assert after[:2] == rows
    assert after[2]["val_top1_teacher"] >= 0 and after[2]["step"] == 9
    assert load_checkpoint(run / "last.pt")["metrics"] == after


def test_tensorboard_gets_the_rows_restored_from_the_checkpoint(runs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _copy(runs["finished"], tmp_path / "run")
    # Epoch 2's row lost by a kill after its checkpoint: the resume writes it, then epoch 3's.
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    assert main(["--resume", str(run), "--epochs", "3", "--tensorboard", "--no-progress"]) == 0
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    rows = {r["epoch"]: r for r in read_metrics(run)}
    scalars = events.Scalars("val/top1_teacher")
    assert [s.step for s in scalars] == [2, 3]
    assert [s.value for s in scalars] == pytest.approx([rows[2]["val_top1_teacher"], rows[3]["val_top1_teacher"]])


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_leaves_one_row_per_epoch(tmp_path):
    run, epochs = tmp_path / "run", 5
    flags = ["--epochs", str(epochs)] + FAST
    # Each command is killed once it has written a checkpoint of its own (a new last.pt: a new inode), at once
    # (between the rename of last.pt and the epoch's row, or during the copy to best.pt), or a little later
    # (inside the next epoch's steps or evaluation). The next command continues from whatever is there.
    for delay in (0.0, 0.5, 0.2):
        where = ["--resume", str(run)] if (run / "last.pt").exists() else ["--out", str(run)]
        previous = _inode(run / "last.pt")
        proc = _start(*where, *flags)
        try:
            _started(proc)
            for _ in range(6000):
                if _inode(run / "last.pt") not in (None, previous) or proc.poll() is not None:
                    break
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            proc.kill()
            proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        # Between kills the files may lack the last checkpoint's row; they never hold an epoch twice or one past it.
        done = _epochs(run)
        assert done == list(range(1, len(done) + 1)) and len(done) <= load_checkpoint(run / "last.pt")["epoch"]
    assert load_checkpoint(run / "last.pt")["epoch"] < epochs
    assert main(["--resume", str(run), *flags]) == 0
    assert _epochs(run) == list(range(1, epochs + 1)) and _csv_epochs(run) == list(range(1, epochs + 1))
    assert load_checkpoint(run / "last.pt")["epoch"] == epochs
    assert not list(run.glob(".*.tmp"))


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_until_the_first_dies(tmp_path, capsys):
    run = tmp_path / "run"
    first = _start("--epochs", "300", "--out", str(run), *FAST)
    try:
        _started(first)
        config = (run / "config.yaml").read_text()
        for _ in range(1200):
            if (run / "last.pt").exists():
                break
            time.sleep(0.05)
        # This test's process is the second one. Another training run, with --out or --resume, is refused.
        busy = f"{run} is in use by another teskd-train run (pid {first.pid} on "
        assert main(["--out", str(run)] + FAST) == 2
        assert busy in capsys.readouterr().err
        with pytest.raises(SystemExit) as e:
            main(["--resume", str(run), "--no-progress"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and busy in err and "Traceback" not in err
        # --eval-only only reads: it takes no lock.
        assert main(["--eval-only", str(run / "last.pt"), "--no-progress"]) == 0
        assert "teacher    top-1" in capsys.readouterr().out
        assert first.poll() is None, "the first run is still training"
        assert (run / "config.yaml").read_text() == config
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    # The kernel dropped the killed run's lock: the folder resumes.
    done = load_checkpoint(run / "last.pt")["epoch"]
    assert main(["--resume", str(run), "--epochs", str(done + 1), "--no-progress"]) == 0
    assert _epochs(run)[-1] == done + 1


def test_processes_forked_by_a_run_do_not_keep_its_lock(tmp_path):
    # A run that forks (data-loader workers) and is then killed: its lock is free while the children live.
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from teskd_fast.train.runfolder import RunLock

        RunLock({str(tmp_path)!r}).acquire()
        child = os.fork()
        if child == 0:
            # Off the parent's output pipes, which the test reads to their end.
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout)
    try:
        os.kill(child, 0)  # the child is alive
        from teskd_fast.train.runfolder import RunLock

        with RunLock(tmp_path) as lock:
            assert lock.held
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_checkpoint_whose_weights_do_not_fit_is_named(runs, tmp_path, capsys):
    run = _copy(runs["finished"], tmp_path / "run")
    ckpt = load_checkpoint(run / "last.pt")
    fc = ckpt["model"].pop("fc.weight")
    (run / "last.pt").unlink()
    torch.save(ckpt, run / "last.pt")
    assert main(["--resume", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'} does not fit the model" in err and "1 missing key(s) ['fc.weight']" in err
    # The keys fit, a shape does not: named with both shapes.
    ckpt["model"]["fc.weight"] = fc
    ckpt["model"]["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    (run / "last.pt").unlink()
    torch.save(ckpt, run / "last.pt")
    assert main(["--resume", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'last.pt'} does not fit the model" in err and "layer1.0.conv1.weight: (3, 3) given" in err


def test_a_checkpoint_older_than_the_oldest_release_is_refused_in_one_line(runs, tmp_path, capsys):
    """A last.pt without the epochs' metrics rows (written before teskd_fast 0.1) is refused with one line and
    exit status 1, not resumed with guessed metrics."""
    old = tmp_path / "old"
    shutil.copytree(runs["finished"], old)
    ckpt = load_checkpoint(old / "last.pt")
    del ckpt["metrics"]
    torch.save(ckpt, old / "last.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(old), "--epochs", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "older than teskd_fast 0.1" in err[0], err


def test_under_torchrun_a_folder_with_this_runs_last_pt_resumes_whatever_the_restart_count(runs, tmp_path, capsys,
                                                                                           monkeypatch):
    """A multi-node restart can leave a node's TORCHELASTIC_RESTART_COUNT at 0 while its peers' is 1: the node
    resumes all the same (the folder's last.pt decides), and another run's last.pt is refused naming the field."""
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    folder = tmp_path / "mid_epoch"
    shutil.copytree(runs["mid_epoch"], folder)
    with pytest.raises(SystemExit) as e:
        main(["--epochs", "3", "--lr", "0.2", "--out", str(folder)] + FAST)
    assert e.value.code == 2 and "lr" in capsys.readouterr().err
    assert main(["--epochs", "3", "--out", str(folder)] + FAST) == 0
    assert "holds a last.pt: resuming from it" in capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(folder)] == [1, 2, 3]
