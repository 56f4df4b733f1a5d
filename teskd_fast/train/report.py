"""What a run reports: the line per epoch, summary.json, the deployable teacher, the final accuracy table.

Everything here reads finished results (metrics rows, the best epoch, the model) and writes or prints them;
nothing here trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from teskd_fast.train.archs import timm_name
from teskd_fast.train.checkpoint import atomic_save, atomic_write_text
from teskd_fast.train.config import TrainConfig


def format_epoch(row: dict[str, Any], parts: list[str], epochs: int) -> str:
    """One line per epoch: loss and its parts, every head's top-1, lr, throughput, time."""
    heads = [k[len("val_top1_"):] for k in row if k.startswith("val_top1_")]
    accs = " ".join(f"{h} {row['val_top1_' + h]:.2f}" for h in heads)
    losses = " ".join(f"{p} {row['train_' + p]:.4g}" for p in parts)
    return (f"epoch {row['epoch']:>3}/{epochs}  loss {row['train_loss']:.4f} ({losses})  top-1 {accs}  "
            f"lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s  {row['epoch_time']:.1f}s")


# Top-5 is printed only with more classes than this: with 5 or fewer, every image is in its top 5 (100%).
TOP5_MIN_CLASSES = 6


def _top5(final: dict[str, Any], key: str, num_classes: int | None) -> str:
    if num_classes is not None and num_classes < TOP5_MIN_CLASSES:
        return ""
    return f"   top-5 {final[key]:6.2f}%"


def summarize(rows: list[dict[str, Any]], cfg: TrainConfig, epochs: int, best: dict[str, Any],
              num_classes: int | None = None) -> dict[str, Any]:
    """The content of summary.json: final accuracies, the best teacher top-1, and the best after ``report_after``
    (with the dataset and, when given, its class count)."""
    last = rows[-1] if rows else {}
    after = round(cfg.report_after * cfg.epochs)
    late = [r for r in rows if r["epoch"] > after] or rows
    best_late = max(late, key=lambda r: r["val_top1_teacher"]) if late else {}
    return {
        "method": cfg.method, "preset": cfg.preset, "dataset": cfg.dataset, "num_classes": num_classes,
        "epochs": epochs,
        "final": {k[len("val_"):]: v for k, v in last.items() if k.startswith("val_top")},
        "best_teacher_top1": best["top1"], "best_epoch": best["epoch"],
        f"best_teacher_top1_after_epoch_{after}": best_late.get("val_top1_teacher"),
    }


# The files a finished run holds beside its checkpoints, written before summary.json (which lists those written).
OUTPUTS = ("teacher.pt", "teacher.safetensors", "teacher.json", "curves.png")


def finished(run_dir: Path, epochs: int) -> bool:
    """Whether the run in ``run_dir`` finished ``epochs`` epochs and holds every file its summary.json lists."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(summary, dict) or summary.get("epochs") != epochs:
        return False
    listed = summary.get("outputs")
    if not isinstance(listed, list):
        return False
    return all((run_dir / name).is_file() for name in listed)


def write_summary(summary: dict[str, Any], run_dir: Path) -> Path:
    path = Path(run_dir) / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    return path


def export_teacher(model: nn.Module, cfg: TrainConfig, num_classes: int, run_dir: Path) -> Path:
    """RUN_DIR/teacher.pt and teacher.safetensors: the plain teacher's state_dict (the safetensors file with
    metadata naming its network); teacher.json says how to build it (:func:`teskd_fast.load_teacher` does)."""
    import teskd_fast
    from teskd_fast.train.teacher_files import teacher_metadata, write_safetensors

    teacher = model if cfg.method == "baseline" else teskd_fast.export_teacher(model)
    state = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
    run_dir = Path(run_dir)
    atomic_save(state, run_dir / "teacher.pt")
    try:
        write_safetensors(state, run_dir / "teacher.safetensors", teacher_metadata(cfg.arch, num_classes, cfg.stem,
                                                                                    cfg.width))
    except ImportError as e:  # a dependency, but a machine without it still gets its teacher.pt
        print(f"teskd-train: no teacher.safetensors: {e} (pip install safetensors)")
    name = timm_name(cfg.arch)
    load = "teskd_fast.load_teacher(RUN_DIR)"
    if name is not None:
        info = {"arch": cfg.arch, "timm": name, "num_classes": num_classes,
                "build": f"{load}; or timm.create_model({name!r}, num_classes={num_classes}) and "
                         "load_state_dict(torch.load('teacher.pt'))"}
    else:
        plain = (f"torchvision.models.{cfg.arch}(num_classes={num_classes}) and "
                 "load_state_dict(torch.load('teacher.pt'))" if cfg.stem == "imagenet" and cfg.width == 1 else
                 f"teskd_fast.models.build_resnet({cfg.arch!r}, {num_classes}, stem={cfg.stem!r}, "
                 f"width={cfg.width!r}) and load_state_dict(torch.load('teacher.pt'))")
        info = {"arch": cfg.arch, "num_classes": num_classes, "stem": cfg.stem, "width": cfg.width,
                "build": f"{load}; or {plain}"}
    atomic_write_text(run_dir / "teacher.json", json.dumps(info, indent=2) + "\n")
    return run_dir / "teacher.pt"


def plot_curves(run_dir: Path) -> None:
    """RUN_DIR/curves.png, or a note when matplotlib is missing."""
    from teskd_fast.train.plot import plot_run

    try:
        plot_run(run_dir)
    except ImportError as e:
        print(f"teskd-train: no curves.png: {e}")


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """The final table: every head's top-1 and top-5 (with 6 classes or more), the best teacher top-1, the run
    folder."""
    final = summary["final"]
    heads = [k[len("top1_"):] for k in final if k.startswith("top1_")]
    # The dataset (a summary.json of teskd_fast 0.1 names only the preset).
    what = summary.get("dataset", summary["preset"])
    if summary.get("dataset") and summary["preset"] not in ("none", summary["dataset"]):
        what += f", preset {summary['preset']}"
    print(f"\nTest accuracy after {summary['epochs']} epochs ({summary['method']}, {what}):")
    for h in heads:
        print(f"  {h:<10} top-1 {final['top1_' + h]:6.2f}%{_top5(final, 'top5_' + h, summary.get('num_classes'))}")
    # The best after epoch N, where the run has epochs after N (otherwise it is the best over all, just above).
    late = [k for k in summary if k.startswith("best_teacher_top1_after_epoch_")
            and int(k.rsplit("_", 1)[1]) < summary["epochs"] and summary[k] is not None]
    print(f"  best teacher top-1 {summary['best_teacher_top1']:.2f}% (epoch {summary['best_epoch']})"
          + (f"; {late[0].replace('_', ' ')}: {summary[late[0]]:.2f}%" if late else ""))
    print(f"Run folder: {run_dir}")


def print_evaluation(metrics: dict[str, float], what: str, dataset: str, num_classes: int | None = None) -> None:
    """``teskd-train --eval-only``'s table: every head's top-1 and top-5 (with 6 classes or more) on the
    validation set."""
    heads = [k[len("val_top1_"):] for k in metrics if k.startswith("val_top1_")]
    print(f"Evaluation of {what} on {dataset} ({int(metrics['_val_images'])} images):")
    for h in heads:
        print(f"  {h:<10} top-1 {metrics['val_top1_' + h]:6.2f}%{_top5(metrics, 'val_top5_' + h, num_classes)}")
