"""teskd_fast.train: the ``teskd-train`` command and its parts.

- :mod:`~teskd_fast.train.config`: :class:`TrainConfig`, the presets, the generated argparse flags;
- :mod:`~teskd_fast.train.cli`: the command itself (flags to config);
- :mod:`~teskd_fast.train.exit_status`: the exit statuses of ``teskd-train`` and ``teskd-compare``;
- :mod:`~teskd_fast.train.build`: the dataset check, loaders, model, loss and optimiser built from a config;
- :mod:`~teskd_fast.train.schedule`: the learning-rate schedule and progressive resizing;
- :mod:`~teskd_fast.train.trainer`: :class:`Trainer` (epochs, evaluation, checkpoints, signals, exact resume);
- :mod:`~teskd_fast.train.api`: :func:`fit`, the same loop on your own model and ``DataLoader``;
- :mod:`~teskd_fast.train.optim`, :mod:`~teskd_fast.train.ema`, :mod:`~teskd_fast.train.recipes`: ``--opt``,
  accumulation and clipping; the teacher's EMA; the timm families' recipes;
- :mod:`~teskd_fast.train.report`: the per-epoch line, summary.json, teacher.pt, the final table;
- :mod:`~teskd_fast.train.checkpoint`: atomic checkpoints, RNG states, loading a run's last.pt;
- :mod:`~teskd_fast.train.metrics`: on-device accumulators and the metrics files;
- :mod:`~teskd_fast.train.distributed`: torchrun / DDP set-up;
- :mod:`~teskd_fast.train.plot`: ``teskd-plot`` (curves.png);
- :mod:`~teskd_fast.train.compare`: ``teskd-compare`` (TESKD against its baseline over seeds; a package: parsing,
  runs, report, plot);
- :mod:`~teskd_fast.train.stats`: mean, standard deviation, Student's t intervals of paired differences.
"""

from teskd_fast.train.cli import main
from teskd_fast.train.config import PRESETS, TrainConfig

__all__ = ["PRESETS", "TrainConfig", "fit", "main"]


def __getattr__(name):
    # fit loads the training loop (torch, the models) on first use: the command's argument parsing needs none of it.
    if name == "fit":
        from teskd_fast.train.api import fit

        return fit
    raise AttributeError(f"module 'teskd_fast.train' has no attribute {name!r}")
