"""``teskd-compare``: TESKD against its same-recipe baseline over several seeds, and the gain with its uncertainty.

Examples::

    teskd-compare                                   # the digits demo on the CPU, 2 seeds, a few minutes
    teskd-compare --preset cifar100-resnet18 --data-dir data/          # 3 seeds x (TESKD, baseline)
    teskd-compare --preset cifar100-resnet18 --seeds 5 --epochs 100 --out runs/c100-short
    torchrun --nproc_per_node 8 -m teskd_fast.train.compare --preset imagenet-resnet18 --data-dir /imagenet

Every ``teskd-train`` flag is accepted and applies to every run, except ``--method`` (both are run),
``--resume`` and ``--eval-only`` (the comparison manages its runs). ``--seed S`` is the first seed; the runs
use seeds ``S, S + 1, ..., S + N - 1``. For each seed, a TESKD run and a baseline run (the TESKD model's own
teacher with plain cross-entropy, the same initial teacher weights and data order) are trained one after the
other, each into an ordinary ``teskd-train`` run folder. ``OUT`` (default ``runs/compare-<preset>``) holds:

- ``config.yaml``: the comparison's training configuration, checked when the command is run again;
- ``teskd-seed<S>/``, ``baseline-seed<S>/``: the run folders (metrics.jsonl, checkpoints, curves.png, ...);
- ``compare.md``, ``compare.json``: per seed and method the teacher's top-1 at the last epoch and by the
  reference's rule (the best after epoch ``round(report_after * epochs)``), the students' and the ensemble's
  top-1 at the last epoch and the run's time; per method the mean and sample standard deviation over seeds;
  the paired difference TESKD minus baseline with its Student's t 95% confidence interval; the paper's
  figures in rows of their own for the presets that reproduce a published table;
- ``compare.png``: the teacher's test top-1 per epoch, for both methods, the mean with a +-1 std band.

Running the same command again continues where it stopped: a finished run (its summary.json written) is
reused, an interrupted one continues from its last.pt (``teskd-train --resume``, exact on the CPU), and nothing
is trained twice. A changed training configuration is refused with a message naming the fields that differ;
flags that do not change what a run computes (``--device``, ``--data-dir``, ``--progress``, ``--plot``, ...)
may change. A different ``--seeds`` adds seeds (or reports over the first N); the others are kept.

Under ``torchrun`` every process runs this command: each run uses all ranks, one run after another, and only
rank 0 writes files. OUT must be on a filesystem every rank sees (as ``teskd-train --resume`` needs).

Exit status: 0 done; 1 a missing dataset or a run folder that cannot be read; 2 a bad flag or a changed
configuration; 3 a non-finite loss; 128 + signal number when a run was stopped (rerun the command to continue).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teskd_fast.train.checkpoint import atomic_write_text
from teskd_fast.train.config import (
    CHANGEABLE_AT_RESUME,
    PRESET_HELP,
    PRESETS,
    ConfigError,
    TrainConfig,
    build_parser,
    config_differences,
    load_yaml,
    resolve,
)
from teskd_fast.train.metrics import read_metrics
from teskd_fast.train.stats import mean, paired_difference, std

METHODS = ("teskd", "baseline")
METHOD_LABEL = {"teskd": "TESKD", "baseline": "baseline"}
# Seeds per comparison when --seeds is not given: the paper's presets 3, the CPU demo 2 (its 4-minute budget).
DEFAULT_SEEDS = {"digits-demo": 2}
DEFAULT_SEEDS_OTHER = 3

# Fields that a rerun may change: those ``teskd-train --resume`` accepts (they choose where and how a run executes,
# or how it is reported, not what it computes) except the number of epochs, which the report is about, plus the
# fields the comparison itself sets per run.
NOT_COMPARED = (CHANGEABLE_AT_RESUME - {"epochs"}) | {"method", "out", "resume", "eval_only"}

# The published figures (arXiv 2110.00329, ResNet-18, one run per method): the teacher's top-1 (%).
# CIFAR-100: the reference code's number, the best test accuracy after epoch 150 of 200. ImageNet: the paper does
# not say at which epoch; its baseline is torchvision's ResNet-18 recipe, whose figure is the last epoch's.
PUBLISHED: dict[str, dict[str, Any]] = {
    "cifar100-resnet18": {"teskd": 79.15, "baseline": 74.41, "metric": "teacher_top1_best_after",
                          "label": "teacher (best after epoch 150 of 200)",
                          "source": "arXiv 2110.00329, CIFAR-100 table (one run per method)"},
    "imagenet-resnet18": {"teskd": 71.14, "baseline": 69.71, "metric": "teacher_top1_last",
                          "label": "teacher (last epoch of 90)",
                          "source": "arXiv 2110.00329, ImageNet table (one run per method)"},
}

# Report columns: key in a run's result, header; students and ensemble exist for TESKD only.
TEACHER_METRICS = ("teacher_top1_last", "teacher_top1_best_after")
HEAD_METRICS = ("student3_top1", "student2_top1", "student1_top1", "ensemble_top1")


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
    if given.pop("list_presets", False):
        for name in sorted(PRESETS):
            print(f"{name:<32} {PRESET_HELP.get(name, '')}")
        raise SystemExit(0)
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


# Configuration records and the refusal of a changed one.


def _record(cmp: Comparison) -> dict[str, Any]:
    train = {k: v for k, v in cmp.base.to_dict().items() if k not in ("method", "out", "resume", "eval_only")}
    return {"seeds": list(cmp.seeds), "train": train}


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CompareError(f"cannot read {path}: {e}", 1) from None
    if not isinstance(data, dict):
        raise CompareError(f"{path} is not a mapping of field: value", 1)
    return data


def check_configuration(cmp: Comparison) -> None:
    """Refuse (:class:`CompareError`, status 2) a comparison folder or run folder made with another configuration."""
    record = cmp.out / "config.yaml"
    refusals, record_diffs, same = [], [], []
    if record.is_file():
        record_diffs = config_differences(_read_yaml(record).get("train", {}), _record(cmp)["train"], NOT_COMPARED)
        if record_diffs:
            refusals.append(f"{record}: {'; '.join(record_diffs)}")
    for run in cmp.runs:
        run_config = run.folder / "config.yaml"
        if run_config.is_file():
            diffs = config_differences(_read_yaml(run_config), run.cfg.to_dict(), NOT_COMPARED)
            if diffs and diffs == record_diffs:
                same.append(run.name)
            elif diffs:
                refusals.append(f"{run_config}: {'; '.join(diffs)}")
    if same:
        refusals.insert(1, f"the same in its run folders {', '.join(same)}")
    if refusals:
        raise CompareError(
            f"{cmp.out} holds a comparison made with another configuration; the fields that differ (stored -> "
            "now):\n  " + "\n  ".join(refusals)
            + "\nRerun with the flags it was started with to continue it, or choose another --out.", 2)


def write_record(cmp: Comparison) -> None:
    import yaml

    atomic_write_text(cmp.out / "config.yaml", yaml.safe_dump(_record(cmp), sort_keys=False))


# Runs.


def run_state(run: Run) -> str:
    """``"done"`` (summary.json for all its epochs), ``"resume"`` (a last.pt to continue from) or ``"new"``."""
    summary = run.folder / "summary.json"
    if summary.is_file() and (run.folder / "teacher.pt").is_file():
        try:
            if json.loads(summary.read_text()).get("epochs") == run.cfg.epochs:
                return "done"
        except (OSError, json.JSONDecodeError):
            pass
    return "resume" if (run.folder / "last.pt").is_file() else "new"


def train_argv(cmp: Comparison, run: Run, state: str) -> list[str]:
    """The ``teskd-train`` command line of one run: the shared flags, then the run's method, seed and folder."""
    # --out last: it overrides the comparison's own --out among the shared flags (a resume accepts its own folder).
    where = (["--resume", str(run.folder)] if state == "resume" else []) + ["--out", str(run.folder)]
    return [*cmp.train_argv, "--method", run.method, "--seed", str(run.seed), *where]


def execute(cmp: Comparison, is_main: bool) -> int:
    """Train the runs that are not finished, one after another; returns 0 or the first failing run's status."""
    from teskd_fast.train import distributed
    from teskd_fast.train.cli import main as train_main

    with distributed.keep_process_group():
        return _execute(cmp, is_main, train_main)


def _execute(cmp: Comparison, is_main: bool, train_main) -> int:
    for i, run in enumerate(cmp.runs, 1):
        state = run_state(run)
        if is_main:
            what = {"done": "finished, reused", "resume": "resuming from its last.pt", "new": "training"}[state]
            print(f"teskd-compare: [{i}/{len(cmp.runs)}] {METHOD_LABEL[run.method]} seed {run.seed}: {what} "
                  f"({run.folder})", flush=True)
        if state == "done":
            continue
        try:
            status = train_main(train_argv(cmp, run, state))
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 2
        if status:
            if is_main:
                print(f"teskd-compare: the run in {run.folder} stopped with status {status}; the finished runs are "
                      "kept: run the same command again to continue", file=sys.stderr)
            return status
    return 0


# Results.


def read_run(run: Run) -> dict[str, Any]:
    """A finished run's figures, from its metrics.jsonl (the per-epoch rows that teskd-train wrote)."""
    try:
        rows = read_metrics(run.folder)
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"cannot read the metrics of {run.folder}: {e}", 1) from None
    epochs = [r.get("epoch") for r in rows]
    if epochs != list(range(1, run.cfg.epochs + 1)):
        raise CompareError(f"{run.folder}/metrics.jsonl holds epochs {epochs}, not 1..{run.cfg.epochs}; "
                           "the run folder is incomplete", 1)
    after = round(run.cfg.report_after * run.cfg.epochs)
    # The reference's rule, as teskd-train's summary.json: the best teacher top-1 after epoch `after`.
    late = [r for r in rows if r["epoch"] > after] or rows
    last = rows[-1]
    result: dict[str, Any] = {
        "seed": run.seed, "method": run.method, "run": run.name, "epochs": run.cfg.epochs,
        "teacher_top1_last": last["val_top1_teacher"],
        "teacher_top1_best_after": max(r["val_top1_teacher"] for r in late),
    }
    for key in HEAD_METRICS:
        result[key] = last.get("val_top1_" + key[: -len("_top1")])
    result["time_s"] = math.fsum(r.get("epoch_time", 0.0) for r in rows)
    result["curve"] = [r["val_top1_teacher"] for r in rows]
    return result


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def summarise(cmp: Comparison, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The report as a JSON-ready dict: per run, per method (mean, std), the paired difference, the paper's."""
    after = round(cmp.base.report_after * cmp.base.epochs)
    by = {m: [r for r in results if r["method"] == m] for m in METHODS}
    methods = {}
    for m, rows in by.items():
        stats = {}
        for key in (*TEACHER_METRICS, *HEAD_METRICS, "time_s"):
            values = [r[key] for r in rows if r[key] is not None]
            if values:
                stats[key] = {"mean": mean(values), "std": _finite(std(values)), "n": len(values)}
        methods[m] = stats
    difference = {}
    for key in TEACHER_METRICS:
        d = paired_difference([r[key] for r in by["teskd"]], [r[key] for r in by["baseline"]]).to_dict()
        difference[key] = {k: _finite(v) if isinstance(v, float) else v for k, v in d.items()}
    paper = None
    if cmp.base.preset in PUBLISHED:
        p = PUBLISHED[cmp.base.preset]
        # The recipe fields this comparison changes from the published preset (then the figures are not like
        # for like); the seed is not one of them.
        published = resolve({"preset": cmp.base.preset, "method": "teskd"}).to_dict()
        current = {**cmp.base.to_dict(), "seed": published["seed"]}
        changed = [d.split(" ", 1)[0] for d in config_differences(published, current, NOT_COMPARED)]
        paper = {**p, "difference": round(p["teskd"] - p["baseline"], 2), "recipe_changes": changed}
    cfg = cmp.base
    return {
        "preset": cfg.preset, "dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width, "epochs": cfg.epochs,
        "seeds": list(cmp.seeds), "best_after_epoch": after, "confidence": 0.95,
        "config": _record(cmp)["train"],
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results],
        "methods": methods, "difference": difference, "paper": paper,
    }


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def _mean_std(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def verdict(d: dict[str, Any]) -> str:
    """Plain words for a paired difference's interval."""
    if d["n"] < 2:
        return "one seed: no interval (it needs at least 2 seeds)"
    if d["contains_zero"]:
        return f"the interval contains 0: no significant difference over {d['n']} seeds"
    better = "better" if d["mean"] > 0 else "worse"
    return f"the interval excludes 0: TESKD is {better} over {d['n']} seeds"


def render_markdown(report: dict[str, Any]) -> str:
    """compare.md: the per-seed table, the per-method table (with the paper's rows) and the paired difference."""
    after = report["best_after_epoch"]
    label = {"teacher_top1_last": "teacher (last epoch)",
             "teacher_top1_best_after": f"teacher (best after epoch {after})"}
    heads = [k[: -len("_top1")] for k in HEAD_METRICS]
    seeds = ", ".join(str(s) for s in report["seeds"])
    n = len(report["seeds"])
    lines = [
        f"# TESKD against its baseline: {report['preset']}, {n} seed{'s' if n > 1 else ''}",
        "",
        f"{report['arch']} (width {report['width']:g}) on {report['dataset']}, {report['epochs']} epochs, seeds "
        f"{seeds}. Per seed, both methods start from the same teacher weights and see the same data order. "
        f"Test top-1 (%): the teacher at the last epoch and by the reference's rule (the best after epoch {after}); "
        "the students and the ensemble at the last epoch. Time: the run's epochs (training and evaluation), "
        "from metrics.jsonl.",
        "",
        "## Per seed",
        "",
        f"| seed | method | {label['teacher_top1_last']} | {label['teacher_top1_best_after']} | "
        + " | ".join(heads) + " | time (s) |",
        "|---:|---|---:|---:|" + "---:|" * len(heads) + "---:|",
    ]
    for r in report["runs"]:
        cells = [_pct(r[k]) for k in (*TEACHER_METRICS, *HEAD_METRICS)]
        lines.append(f"| {r['seed']} | {METHOD_LABEL[r['method']]} | " + " | ".join(cells) + f" | {r['time_s']:.1f} |")
    lines += [
        "",
        "## Per method: mean ± standard deviation over seeds",
        "",
        f"| method | seeds | {label['teacher_top1_last']} | {label['teacher_top1_best_after']} | "
        + " | ".join(heads) + " | time (s) |",
        "|---|---:|---:|---:|" + "---:|" * len(heads) + "---:|",
    ]
    for m, stats in report["methods"].items():
        cells = [_mean_std(stats.get(k)) for k in (*TEACHER_METRICS, *HEAD_METRICS)]
        lines.append(f"| {METHOD_LABEL[m]} (ours) | {n} | " + " | ".join(cells)
                     + f" | {_mean_std(stats.get('time_s'), 1)} |")
    paper = report["paper"]
    if paper:
        for m in METHODS:
            cells = [_pct(paper[m]) if k == paper["metric"] else "–" for k in (*TEACHER_METRICS, *HEAD_METRICS)]
            lines.append(f"| {METHOD_LABEL[m]} (paper's figure) | 1 | " + " | ".join(cells) + " | – |")
    lines += [
        "",
        "## TESKD minus baseline, paired by seed",
        "",
        "The mean of the per-seed differences, their standard deviation, and the 95% confidence interval "
        "mean ± t(0.975, n-1) · std / √n (Student's t on the paired differences).",
        "",
        "| teacher top-1 | mean difference | std | 95% interval | t(0.975, n-1) | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key in TEACHER_METRICS:
        d = report["difference"][key]
        ci = f"[{_pct(d['low'], True)}, {_pct(d['high'], True)}]" if d["n"] >= 2 else "–"
        t = f"{d['t_critical']:.3f}" if d["n"] >= 2 else "–"
        lines.append(f"| {label[key]} (ours) | {_pct(d['mean'], True)} | {_pct(d['std'])} | {ci} | {t} | "
                     f"{verdict(d)} |")
    if paper:
        lines.append(f"| {paper['label']} (paper's figure) | {_pct(paper['difference'], True)} | – | – | – "
                     f"| one run per method: no interval |")
        lines += ["", f"The paper's figures: {paper['source']}; its {paper['label']}, shown in the column of "
                  "that rule."]
        if paper["recipe_changes"]:
            lines[-1] += (f" This comparison changes the published recipe ({', '.join(paper['recipe_changes'])}): "
                          "its figures and the paper's are not like for like.")
    return "\n".join(lines) + "\n"


def plot_curves(report: dict[str, Any], results: list[dict[str, Any]], path: Path) -> Path:
    """compare.png: the teacher's test top-1 per epoch, per method the mean over seeds with a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    epochs = report["epochs"]
    x = list(range(1, epochs + 1))
    first_zoomed = epochs // 2
    for m, color in zip(METHODS, ("tab:red", "tab:blue")):
        curves = [r["curve"] for r in results if r["method"] == m]
        mu = [mean(c) for c in zip(*curves)]
        sd = [std(c) if len(curves) > 1 else 0.0 for c in zip(*curves)]
        for ax, lo in ((axes[0], 0), (axes[1], first_zoomed)):
            ax.plot(x[lo:], mu[lo:], color=color, lw=2, label=f"{METHOD_LABEL[m]}: mean of {len(curves)} seeds")
            if len(curves) > 1:
                ax.fill_between(x[lo:], [a - b for a, b in zip(mu, sd)][lo:], [a + b for a, b in zip(mu, sd)][lo:],
                                color=color, alpha=0.2, lw=0, label=f"{METHOD_LABEL[m]}: ± 1 std")
    paper = report["paper"]
    if paper:
        for m, color in zip(METHODS, ("tab:red", "tab:blue")):
            for ax in axes:
                ax.axhline(paper[m], color=color, ls="--", lw=1, label=f"{METHOD_LABEL[m]}: paper's {paper[m]:.2f}")
    axes[0].set(title="teacher test top-1 (%)", xlabel="epoch")
    axes[1].set(title=f"from epoch {first_zoomed + 1}", xlabel="epoch")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"TESKD against its baseline: {report['preset']}, seeds {', '.join(map(str, report['seeds']))}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(cmp: Comparison) -> dict[str, Any]:
    """Read every run, write OUT/compare.json, compare.md and compare.png; return the report."""
    results = [read_run(run) for run in cmp.runs]
    report = summarise(cmp, results)
    atomic_write_text(cmp.out / "compare.json", json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    atomic_write_text(cmp.out / "compare.md", markdown)
    if cmp.base.plot:
        try:
            plot_curves(report, results, cmp.out / "compare.png")
        except ImportError as e:
            print(f"teskd-compare: no compare.png (matplotlib is needed: pip install matplotlib): {e}")
    print("\n" + markdown)
    print(f"teskd-compare: wrote {cmp.out / 'compare.md'}, compare.json"
          + (", compare.png" if cmp.base.plot else ""))
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``teskd-compare`` and ``python -m teskd_fast.train.compare``; returns the exit status."""
    cmp = parse(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    t0 = time.perf_counter()
    try:
        check_configuration(cmp)
        if is_main:
            write_record(cmp)
        status = execute(cmp, is_main)
        if status or not is_main:
            return status
        write_report(cmp)
    except CompareError as e:
        if is_main:
            print(f"teskd-compare: {e}", file=sys.stderr)
        return e.status
    except OSError as e:
        # OUT not writable, a file where a folder should be, a disk full.
        print(f"teskd-compare: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nteskd-compare: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    print(f"teskd-compare: {len(cmp.runs)} runs in {cmp.out}; this invocation took {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
