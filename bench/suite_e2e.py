"""The GPU suite's end-to-end stage: one short ``teskd-train`` on a CIFAR-format dataset this script writes.

Usage: ``python bench/suite_e2e.py WORK [--dry-run]``

Writes a learnable CIFAR-10 python-version folder (``WORK/data/cifar-10-batches-py``: each class its own mean
colour and stripe frequency under noise, so that a few hundred steps reach well above chance), trains with
``python -m teskd_fast.train`` (what the ``teskd-train`` console script runs; it also works from the source tree)
and writes ``WORK/e2e.json``: the command, exit status, images/s per epoch, the final accuracies and the best
teacher top-1. On CUDA: compiled, bf16, channels-last (teskd-train's defaults there), the split resident in GPU
memory, 3 epochs of 100 steps at batch 256. ``--dry-run`` (no CUDA): the same command on the CPU at tiny sizes
(a 1/16-width network, fp32, not compiled, 2 epochs of 4 steps).
"""

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 10


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
    common = ["--preset", "cifar100-resnet18", "--dataset", "cifar10", "--data-dir", str(data_dir),
              "--out", str(run_dir), "--no-progress", "--no-tensorboard", "--no-plot", "--lr", "0.05"]
    if dry_run:
        return common + ["--device", "cpu", "--precision", "fp32", "--no-compile", "--width", "0.0625",
                         "--batch-size", "32", "--epochs", "2", "--steps-per-epoch", "4"]
    return common + ["--device", "cuda", "--precision", "bf16", "--compile", "--channels-last",
                     "--batch-size", "256", "--epochs", "3"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(__doc__)
    work, dry_run = Path(argv[0]), "--dry-run" in argv[1:]
    (work / "e2e").mkdir(parents=True, exist_ok=True)
    # Sizes that the batch divides: no partial batch, so no tail shape to compile for.
    n_train, n_test = (256, 64) if dry_run else (25_600, 5_120)
    data_dir = write_cifar10(work / "e2e" / "data", n_train, n_test)
    run_dir = work / "e2e" / "run"
    args = [sys.executable, "-m", "teskd_fast.train", *command(data_dir, run_dir, dry_run)]
    print("e2e:", " ".join(args), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        # The stage's cap: teskd-train got the same SIGINT (one process group); it writes last.pt and stops.
        rc = proc.wait()
    result = {"command": " ".join(["teskd-train", *args[3:]]), "exit_status": rc,
              "seconds": round(time.perf_counter() - start, 1), "chance": 1 / CLASSES}
    rows = []
    if (run_dir / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    result["images_per_s"] = [round(r["images_per_s"]) for r in rows if "images_per_s" in r]
    # The first epoch includes the compiles; the last one is the steady figure.
    result["images_per_s_last_epoch"] = result["images_per_s"][-1] if result["images_per_s"] else None
    result["steps"] = len(rows) * (4 if dry_run else n_train // 256)
    result["final"] = summary.get("final")
    result["teacher_top1"] = summary.get("best_teacher_top1")
    (work / "e2e.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
