"""``teskd-plot RUN_DIR [RUN_DIR ...]``: accuracy and loss curves per head, drawn to RUN_DIR/curves.png."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from teskd_fast.train.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw validation top-1 per head, the train loss and its parts, and the learning rate per epoch.

    Args:
        run_dir: a teskd-train run folder (holding metrics.jsonl).
        out: the image to write (default ``RUN_DIR/curves.png``).

    Returns:
        the path of the written PNG.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("teskd-plot needs matplotlib: pip install matplotlib") from e
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no epoch yet")
    epochs = [r["epoch"] for r in rows]
    heads = [k[len("val_top1_"):] for k in rows[-1] if k.startswith("val_top1_")]
    parts = [k for k in rows[-1] if k.startswith("train_") and k not in ("train_time", "train_top1_teacher")]

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for h in heads:
        ax.plot(epochs, [r.get(f"val_top1_{h}") for r in rows], label=h, lw=2 if h == "teacher" else 1)
    ax.plot(epochs, [r.get("train_top1_teacher") for r in rows], "k--", lw=1, label="teacher (train)")
    ax.set(title="top-1 accuracy (%)", xlabel="epoch")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    for p in parts:
        values = [r.get(p) for r in rows]
        if all(v is not None and v > 0 for v in values):
            ax.plot(epochs, values, label=p[len("train_"):] if p != "train_loss" else "total (weighted)")
    ax.plot(epochs, [r.get("val_loss_teacher") for r in rows], "k--", lw=1, label="teacher CE (val)")
    ax.set(title="loss and its unweighted parts", xlabel="epoch", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(epochs, [r.get("lr") for r in rows])
    ax.set(title="learning rate (last step of the epoch)", xlabel="epoch")
    ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``teskd-plot``."""
    parser = argparse.ArgumentParser(prog="teskd-plot", description="Draw RUN_DIR/curves.png from metrics.jsonl.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="teskd-train run folder(s)")
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        try:
            print(plot_run(run_dir))
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"teskd-plot: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
