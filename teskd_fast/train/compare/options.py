"""``teskd-compare``'s command line: its parser (``teskd-train``'s plus ``--seeds``), the parsed :class:`Comparison`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teskd_fast.train.config import (
    CHANGEABLE_AT_RESUME,
    METHODS,
    ConfigError,
    TrainConfig,
    build_parser,
    load_yaml,
    resolve,
)

METHOD_LABEL = {"teskd": "TESKD", "baseline": "baseline"}
# Seeds per comparison when --seeds is not given: the paper's presets 3, the CPU demo 2 (its 4-minute budget).
DEFAULT_SEEDS = {"digits-demo": 2}
DEFAULT_SEEDS_OTHER = 3
# Fields that a rerun may change: those ``teskd-train --resume`` accepts (they choose where and how a run executes,
# or how it is reported, not what it computes) except the number of epochs, which the report is about, plus the
# fields the comparison itself sets per run.
NOT_COMPARED = (CHANGEABLE_AT_RESUME - {"epochs"}) | {"method", "out", "resume", "eval_only"}


class CompareError(RuntimeError):
    """A run folder that cannot be used; ``status`` is the exit status (1: unreadable, 2: configuration)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Run:
    """One training run of the comparison."""

    seed: int
    method: str
    folder: Path
    cfg: TrainConfig

    @property
    def name(self) -> str:
        return self.folder.name


@dataclass(frozen=True)
class Comparison:
    """The parsed command: where it goes, the seeds, the runs and the ``teskd-train`` flags shared by all."""

    out: Path
    base: TrainConfig
    seeds: tuple[int, ...]
    runs: tuple[Run, ...]
    train_argv: tuple[str, ...]


def build_compare_parser() -> argparse.ArgumentParser:
    """``teskd-train``'s parser, renamed, with ``--seeds`` added and ``--out`` / ``--seed`` re-described."""
    parser = build_parser()
    parser.prog = "teskd-compare"
    parser.description = ("Train TESKD and its same-recipe baseline for several seeds and report the gain with its "
                          "95% confidence interval. With no arguments: the digits demo on the CPU, 2 seeds.")
    parser.epilog = ("Every teskd-train flag applies to every run. Rerunning the same command continues it. "
                     "Multi-GPU: torchrun --nproc_per_node N -m teskd_fast.train.compare --preset ...")
    # Exact flag names only: --seed (the first seed) and --seeds (how many) must never be taken for each other.
    parser.allow_abbrev = False
    parser.add_argument("--seeds", type=int, metavar="N",
                        help=f"number of seeds (default {DEFAULT_SEEDS_OTHER}; {DEFAULT_SEEDS['digits-demo']} for "
                        "digits-demo)")
    actions = parser._option_string_actions
    actions["--out"].help = "the comparison's folder (default: runs/compare-<preset>)"
    actions["--seed"].help = "the first seed: the runs use seeds SEED, SEED+1, ... (default: the preset's)"
    actions["--method"].help = "not accepted: every seed runs both methods"
    actions["--resume"].help = "not accepted: run the same teskd-compare command again to continue"
    actions["--eval-only"].help = "not accepted"
    return parser


def _strip_seeds(argv: list[str]) -> list[str]:
    """``argv`` without ``--seeds N`` / ``--seeds=N``: the rest is what every run's ``teskd-train`` gets."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--seeds":
            skip = True
        elif not tok.startswith("--seeds="):
            out.append(tok)
    return out


def parse(argv: list[str] | None) -> Comparison:
    """Parse and validate the command line; a bad flag exits with status 2 and a message naming it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_compare_parser()
    given = vars(parser.parse_args(argv))
    n_seeds = given.pop("seeds", None)
    try:
        overrides = load_yaml(given.pop("config")) if "config" in given else {}
        overrides.update(given)
        for name in ("method", "resume", "eval_only"):
            if name in overrides:
                raise ConfigError(f"--{name.replace('_', '-')} is not accepted: "
                                  + ("every seed runs both methods" if name == "method" else
                                     "teskd-compare manages its runs; run the same command again to continue"))
        base = resolve({**overrides, "method": "teskd"})
        if n_seeds is None:
            n_seeds = DEFAULT_SEEDS.get(base.preset, DEFAULT_SEEDS_OTHER)
        if n_seeds < 1:
            raise ConfigError(f"--seeds: must be >= 1, got {n_seeds}")
        out = Path(base.out) if base.out else Path("runs") / f"compare-{base.preset}"
        seeds = tuple(base.seed + i for i in range(n_seeds))
        runs = []
        for seed in seeds:
            for method in METHODS:
                folder = out / f"{method}-seed{seed}"
                cfg = resolve({**overrides, "method": method, "seed": seed, "out": str(folder)})
                runs.append(Run(seed, method, folder, cfg))
    except ConfigError as e:
        parser.error(str(e))
        raise  # parser.error exits; never reached
    return Comparison(out, base, seeds, tuple(runs), tuple(_strip_seeds(argv)))


def config_record(cmp: Comparison) -> dict[str, Any]:
    """OUT/config.yaml: the seeds and the training configuration shared by every run."""
    train = {k: v for k, v in cmp.base.to_dict().items() if k not in ("method", "out", "resume", "eval_only")}
    return {"seeds": list(cmp.seeds), "train": train}
