"""The GPU suite's end-to-end stage: one short ``teskd-train`` on a CIFAR-format dataset this script writes.

Usage: ``python bench/suite_e2e.py WORK [--dry-run] [--deadline SECONDS_SINCE_EPOCH]``

Writes a learnable CIFAR-10 python-version folder (``WORK/data/cifar-10-batches-py``: each class its own mean
colour and stripe frequency under noise, so that a few hundred steps reach well above chance), trains with
``python -m teskd_fast.train`` (what the ``teskd-train`` console script runs; it also works from the source tree)
and writes ``WORK/e2e.json``: the command, exit status, images/s per epoch, the final accuracies and the best
teacher top-1. On CUDA: compiled, bf16, channels-last (teskd-train's defaults there), the split resident in GPU
memory, 3 epochs of 100 steps at batch 256. ``--dry-run`` (no CUDA): the same command on the CPU at tiny sizes
(a 1/16-width network, fp32, not compiled, 2 epochs of 4 steps).

Bounded: teskd-train runs in a process group of its own; at ``--deadline`` (or at this script's SIGINT) it
gets SIGINT, and GRACE_S seconds later the whole group (inductor's compile workers included) SIGKILL. ``e2e.json``
is written in every case, from what ``metrics.jsonl`` holds and the progress teskd-train printed: a stopped run
says "stopped at step N by ..., in a compile" (or "after writing last.pt"), with the finished epochs' figures.
"""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CLASSES = 10
# After SIGINT, the seconds teskd-train gets to finish its step and write last.pt before its group is killed.
GRACE_S = 8


def write_cifar10(root, n_train, n_test, seed=0):
    """A CIFAR-10 python-version folder under ``root`` whose labels can be learnt; returns its parent."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    colours = rng.uniform(40, 215, (CLASSES, 3))
    cols = np.arange(32)

    def split(n):
        labels = rng.integers(0, CLASSES, n)
        stripes = 30 * np.sin(cols[None, :] * (labels[:, None] + 1) * np.pi / 16)  # [n, 32] along the width
        images = colours[labels][:, :, None, None] + stripes[:, None, None, :] + rng.normal(0, 25, (n, 3, 32, 32))
        return np.clip(images, 0, 255).astype(np.uint8).reshape(n, -1), labels.tolist()

    def write(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    train_x, train_y = split(n_train)
    parts = np.array_split(np.arange(n_train), 5)
    for i, p in enumerate(parts, 1):
        write(f"data_batch_{i}", {"data": train_x[p], "labels": [train_y[j] for j in p]})
    test_x, test_y = split(n_test)
    write("test_batch", {"data": test_x, "labels": test_y})
    write("batches.meta", {"label_names": [f"class{i}" for i in range(CLASSES)]})
    return Path(root)


def command(data_dir, run_dir, dry_run):
    """The teskd-train command line of this stage (``python -m teskd_fast.train`` is the console script)."""
    # The progress bar (every 10 steps) is how this script knows the step a stopped run reached.
    common = ["--preset", "cifar100-resnet18", "--dataset", "cifar10", "--data-dir", str(data_dir),
              "--out", str(run_dir), "--no-tensorboard", "--no-plot", "--lr", "0.05", "--log-every", "10"]
    if dry_run:
        return common + ["--device", "cpu", "--precision", "fp32", "--no-compile", "--width", "0.0625",
                         "--batch-size", "32", "--epochs", "2", "--steps-per-epoch", "4"]
    return common + ["--device", "cuda", "--precision", "bf16", "--compile", "--channels-last",
                     "--batch-size", "256", "--epochs", "3"]


_BAR = re.compile(r"epoch (\d+)/(\d+):[^\r\n]*?\| *(\d+)/(\d+) \[([^\]\r\n]*)\]")
_STOPPED = re.compile(r"stopped by (\w+) at epoch (\d+), batch (\d+)/(\d+)")


class Progress:
    """What teskd-train's output says of its progress: the last progress bar (epoch, step in it, steps, img/s)
    and its own "stopped by SIGNAL at epoch E, batch B/S" line."""

    def __init__(self):
        self.bar = None
        self.stopped_line = None
        self._text = ""

    def feed(self, text):
        self._text = (self._text + text)[-4096:]
        for m in _BAR.finditer(self._text):
            rate = re.search(r"img_s=(\d+)", m.group(5))
            self.bar = (int(m.group(1)), int(m.group(3)), int(m.group(4)), int(rate.group(1)) if rate else None)
        if (m := _STOPPED.search(self._text)) is not None:
            self.stopped_line = (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))

    def step(self):
        """(steps done in all, the epoch's img/s so far) by the last line seen; (0, None) before any."""
        if self.stopped_line is not None:
            _, epoch, batch, steps = self.stopped_line
            return (epoch - 1) * steps + batch, None if self.bar is None else self.bar[3]
        if self.bar is None:
            return 0, None
        epoch, done, steps, rate = self.bar
        return (epoch - 1) * steps + done, rate


def _kill_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def supervise(args, budget_s, grace_s, env=None):
    """Run ``args`` in a process group of its own, for at most ``budget_s`` seconds (None: no bound).

    At the budget, or when this script gets SIGINT (the stage's cap), the group gets SIGINT (teskd-train finishes
    its step and writes last.pt); if it has not ended ``grace_s`` later (a compile: inductor's compile workers
    ignore SIGINT, and teskd-train acts on its stop flag only between steps), SIGKILL takes the whole group, the
    compile workers included. Its output is copied to this script's. Returns (exit status, how it stopped or
    None, :class:`Progress`, whether it was killed)."""
    progress = Progress()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def copy():
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            progress.feed(chunk.decode(errors="replace"))

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    why, killed = None, False
    try:
        rc = proc.wait(timeout=budget_s)
    except subprocess.TimeoutExpired:
        why = f"its time budget ({budget_s:.0f} s)"
    except KeyboardInterrupt:
        why = "the stage's cap (SIGINT)"
    if why is not None:
        _kill_group(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=grace_s)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            killed = True
            _kill_group(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    # Whatever the group left behind (compile workers of a finished or killed teskd-train).
    _kill_group(proc.pid, signal.SIGKILL)
    reader.join(timeout=5)
    return rc, why, progress, killed


def result(run_dir, argv, rc, seconds, why, progress, killed, steps_per_epoch):
    """The stage's figures, from the run's metrics.jsonl (finished epochs) and summary.json, and how it ended."""
    rows = []
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                pass
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    out = {"command": " ".join(["teskd-train", *argv[3:]]), "exit_status": rc, "seconds": round(seconds, 1),
           "chance": 1 / CLASSES}
    out["images_per_s"] = [round(r["images_per_s"]) for r in rows if "images_per_s" in r]
    # The first epoch includes the compiles; the last one is the steady figure.
    out["images_per_s_last_epoch"] = out["images_per_s"][-1] if out["images_per_s"] else None
    step, rate = progress.step()
    out["steps"] = max(len(rows) * steps_per_epoch, step)
    out["final"] = summary.get("final")
    out["teacher_top1"] = summary.get("best_teacher_top1")
    out["stopped"] = None
    if why is not None:
        where = ("in a compile (or an evaluation): it did not stop within the grace after SIGINT, so its process "
                 "group was killed" if killed else "after writing last.pt")
        out["stopped"] = f"stopped at step {out['steps']} by {why}, {where}; {len(rows)} epoch(s) finished"
        out["images_per_s_unfinished_epoch"] = rate
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    work, dry_run = Path(argv[0]), "--dry-run" in argv[1:]
    # --deadline: the time (seconds since the epoch) by which teskd-train must have been stopped.
    deadline = float(argv[argv.index("--deadline") + 1]) if "--deadline" in argv else None
    (work / "e2e").mkdir(parents=True, exist_ok=True)
    # Sizes that the batch divides: no partial batch, so no tail shape to compile for.
    n_train, n_test = (256, 64) if dry_run else (25_600, 5_120)
    data_dir = write_cifar10(work / "e2e" / "data", n_train, n_test)
    run_dir = work / "e2e" / "run"
    args = [sys.executable, "-m", "teskd_fast.train", *command(data_dir, run_dir, dry_run)]
    print("e2e:", " ".join(args), flush=True)
    start = time.perf_counter()
    budget = None if deadline is None else max(deadline - time.time(), 1.0)
    rc, why, progress, killed = supervise(args, budget, GRACE_S, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = result(run_dir, args, rc, time.perf_counter() - start, why, progress, killed, 4 if dry_run else 100)
    tmp = work / ".e2e.json.tmp"
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, work / "e2e.json")
    print(json.dumps(out, indent=1))
    return rc if why is None else 124


if __name__ == "__main__":
    sys.exit(main())
