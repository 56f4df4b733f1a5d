"""Metrics accumulated on the device (one synchronisation per epoch), and the run's log files.

Per epoch, rank 0 appends one row to ``RUN_DIR/metrics.jsonl`` and ``RUN_DIR/metrics.csv`` and, when
tensorboard is installed, writes the same scalars as TensorBoard events under ``RUN_DIR/tb``. The checkpoint
holds the same rows (:class:`teskd_fast.train.trainer.Trainer`); a resumed run rewrites the files from them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch

from teskd_fast.loss.options import SUMMED_PARTS

# Steps index into this sentinel when no step went non-finite.
NO_STEP = 2**62


def head_names(num_students: int, levels: tuple[int, ...] | None = None) -> list[str]:
    """Names of the heads in output order: teacher, then students deepest first (``levels``; default 3, 2, 1)."""
    levels = levels if levels is not None else tuple(range(num_students, 0, -1))
    return ["teacher"] + [f"student{level}" for level in levels]


class TrainAccumulator:
    """Sums of the loss and its parts, teacher train accuracy and a non-finite marker, kept on the device.

    ``update`` never synchronises the host with the device; ``read`` does, once.

    Args:
        parts: names of the loss parts (:data:`teskd_fast.loss.options.PARTS`, or ``BASELINE_PARTS``
            for the baseline).
        device: where the sums live.
    """

    def __init__(self, parts: list[str], device: torch.device):
        self.parts = list(parts)
        self.device = device
        n = 1 + len(self.parts)
        # [loss, *parts, correct, seen, batches]
        self.sums = torch.zeros(n + 3, dtype=torch.float64, device=device)
        # First step at which the total or a part was non-finite, per [loss, *parts].
        self.first_bad = torch.full((n,), NO_STEP, dtype=torch.int64, device=device)

    def update(self, step: torch.Tensor, loss: torch.Tensor, parts: dict[str, torch.Tensor],
               logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one step. ``step`` is a 0-dim int64 tensor on the device (no host-to-device copy here)."""
        values = torch.stack([loss.detach().float()] + [parts[p].detach().float() for p in self.parts])
        finite = torch.isfinite(values)
        self.first_bad = torch.minimum(self.first_bad, torch.where(finite, NO_STEP, step))
        correct = (logits.detach().argmax(dim=1) == target).sum()
        # torch.full launches a fill kernel: no host-to-device copy, no synchronisation.
        seen = torch.full((), float(target.numel()), dtype=torch.float64, device=self.device)
        extra = torch.stack([correct.double(), seen, torch.ones((), dtype=torch.float64, device=self.device)])
        self.sums += torch.cat([values.double(), extra])

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the sums of a checkpoint (``{"sums", "first_bad"}``, as the trainer saves them mid-epoch)."""
        self.sums.copy_(state["sums"])
        self.first_bad.copy_(state["first_bad"])

    def packed(self) -> torch.Tensor:
        """Everything in one float64 vector, for one all-reduce and one device-to-host copy."""
        return torch.cat([self.sums, self.first_bad.double()])

    def unpack(self, vec: list[float], world_size: int = 1) -> dict[str, Any]:
        """Turn a (reduced) :meth:`packed` vector into per-epoch means.

        The sums over batches are divided by the number of batches; with several processes the vector was
        summed over them, and so were the batch counts, so the means are over all processes' batches. A part that
        is a sum over the batch (``SUMMED_PARTS``, the feature loss) has the sum over processes as its global-batch
        value, so its mean is multiplied back by ``world_size``.
        """
        n = 1 + len(self.parts)
        sums, bad = vec[: n + 3], vec[n + 3 :]
        batches = max(sums[n + 2], 1.0)
        out: dict[str, Any] = {"train_loss": sums[0] / batches}
        for i, p in enumerate(self.parts):
            scale = world_size if p in SUMMED_PARTS else 1
            out[f"train_{p}"] = sums[1 + i] / batches * scale
        out["train_top1_teacher"] = 100.0 * sums[n] / max(sums[n + 1], 1.0)
        out["_images"] = sums[n + 1]
        # The processes that trained the epoch: device hours are its time times them (teskd-compare's cost).
        out["processes"] = world_size
        bad_steps = {name: int(b) for name, b in zip(["loss"] + self.parts, bad, strict=True) if b < NO_STEP}
        out["_nonfinite"] = bad_steps
        return out


class EvalAccumulator:
    """Top-1 / top-5 correct counts per head (and the ensemble) and the teacher's loss, on the device."""

    def __init__(self, heads: list[str], device: torch.device):
        self.heads = list(heads) + (["ensemble"] if len(heads) > 1 else [])
        # [H, 2] correct counts, then [loss_sum, seen]
        self.correct = torch.zeros(len(self.heads), 2, dtype=torch.float64, device=device)
        self.other = torch.zeros(2, dtype=torch.float64, device=device)

    def update(self, logits: list[torch.Tensor], target: torch.Tensor) -> None:
        """Add one batch. ``logits`` in head order: teacher first. Shapes: each ``[B, C]``, target ``[B]``."""
        logits = [z.float() for z in logits]
        if len(logits) > 1:
            # Ensemble: the mean of every head's softmax.
            logits = logits + [torch.stack([z.softmax(dim=1) for z in logits]).mean(dim=0).log()]
        k = min(5, logits[0].shape[1])
        rows = []
        for z in logits:
            top = z.topk(k, dim=1).indices  # [B, k]
            hit = top == target[:, None]
            rows.append(torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()]))
        self.correct += torch.stack(rows).double()
        loss = torch.nn.functional.cross_entropy(logits[0], target, reduction="sum")
        seen = torch.full((), float(target.numel()), dtype=torch.float64, device=self.other.device)
        self.other += torch.stack([loss.double(), seen])

    def packed(self) -> torch.Tensor:
        return torch.cat([self.correct.flatten(), self.other])

    def unpack(self, vec: list[float]) -> dict[str, float]:
        h = len(self.heads)
        seen = max(vec[2 * h + 1], 1.0)
        out = {"val_loss_teacher": vec[2 * h] / seen}
        for i, name in enumerate(self.heads):
            out[f"val_top1_{name}"] = 100.0 * vec[2 * i] / seen
            out[f"val_top5_{name}"] = 100.0 * vec[2 * i + 1] / seen
        out["_val_images"] = vec[2 * h + 1]
        return out


class LaggedReader:
    """Reads a device tensor for display without waiting for the device.

    ``push`` starts a non-blocking copy into pinned host memory; ``latest`` returns the most recent copy that
    has completed (checked with a CUDA event query, which never blocks), or None. On the CPU it is immediate.
    The pinned buffer and the event belong to the pushed tensor's device, and the event is recorded on that
    device's current stream (the one the copy is queued on), whatever the process's current CUDA device is.

    Args:
        device: where the pushed tensors live (its type decides between the CUDA and the immediate path).
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._pending: list[tuple[torch.Tensor, Any]] = []
        self._value: list[float] | None = None

    def push(self, tensor: torch.Tensor) -> None:
        """Start copying ``tensor`` to the host."""
        if self.device.type != "cuda":
            self._value = tensor.detach().tolist()
            return
        with torch.cuda.device(tensor.device):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor.detach(), non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensor.device))
        self._pending.append((host, event))

    def latest(self) -> list[float] | None:
        while self._pending and self._pending[0][1].query():
            host, _ = self._pending.pop(0)
            self._value = host.tolist()
        return self._value


class MetricsLog:
    """Appends one row per epoch to metrics.jsonl and metrics.csv (and TensorBoard when installed).

    Args:
        run_dir: the run folder.
        tensorboard: write TensorBoard events if the ``tensorboard`` package is importable; True (asked for)
            says so when it is not, None (the default) stays silent, False writes none.
        rows: the rows of the epochs already finished (a resumed checkpoint's): the files are rewritten to hold
            exactly these, whatever they held (rows logged after that checkpoint are dropped, rows missing from
            the files, because the process was killed between writing the checkpoint and logging, come back;
            their TensorBoard scalars are written again too). None: the files' rows are kept.
    """

    def __init__(self, run_dir: Path, tensorboard: bool | None = None, rows: list[dict[str, Any]] | None = None):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        logged = read_metrics(self.run_dir, strict=False)
        if rows is not None:
            self.rows = list(rows)
        else:
            self.rows = logged
        self._rewrite()
        self.tb = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                        print("teskd-train: tensorboard is not installed (pip install tensorboard); "
                          "writing metrics.jsonl and metrics.csv only")
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tb"))
                logged_epochs = {r.get("epoch") for r in logged}
                for row in self.rows:
                    if row.get("epoch") not in logged_epochs:
                        self._add_scalars(row)

    def _rewrite(self) -> None:
        with open(self.jsonl, "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")
        self._write_csv()

    def _write_csv(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)

    def log(self, row: dict[str, Any]) -> None:
        """Append one epoch's row (plain floats/ints/strings)."""
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        # The csv is rewritten whole: columns may appear (a head added) and the file is small.
        self._write_csv()
        if self.tb is not None:
            self._add_scalars(row)

    def _add_scalars(self, row: dict[str, Any]) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "epoch" and math.isfinite(v):
                self.tb.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path, strict: bool = True) -> list[dict[str, Any]]:
    """Rows of ``RUN_DIR/metrics.jsonl`` (one dict per epoch).

    ``strict=False``: what the file holds up to a line cut short by a killed write, and no error for a missing
    file (the rows a resume compares with its checkpoint's)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        if not strict:
            return []
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: is it a teskd-train run folder?")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
                if strict and not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object of field: value")
            except ValueError as e:
                if strict:
                    raise ValueError(f"{path}: line {number} is not a JSON row ({e}); a run killed while writing "
                                     "it leaves its last line cut short: `teskd-train --resume` rewrites the file "
                                     "from last.pt") from None
                break
            rows.append(row)
    return rows if strict else [r for r in rows if isinstance(r, dict)]
