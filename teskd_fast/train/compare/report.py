"""The comparison's report: each run's figures, the statistics over seeds, compare.json and compare.md."""

from __future__ import annotations

import json
import math
from typing import Any

from teskd_fast.train.checkpoint import atomic_write_text
from teskd_fast.train.compare.options import METHOD_LABEL, NOT_COMPARED, CompareError, Comparison, Run, config_record
from teskd_fast.train.compare.plot import plot_curves
from teskd_fast.train.config import METHODS, config_differences, resolve
from teskd_fast.train.metrics import read_metrics
from teskd_fast.train.stats import mean, paired_difference, std

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
        "config": config_record(cmp)["train"],
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


def _table_head(first: str, first_rule: str, label: dict[str, str], heads: list[str]) -> list[str]:
    """A results table's header and rule: the first columns, the two teacher columns, the heads, the time."""
    return [f"{first} {label['teacher_top1_last']} | {label['teacher_top1_best_after']} | " + " | ".join(heads)
            + " | time (s) |", first_rule + "---:|---:|" + "---:|" * len(heads) + "---:|"]


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
        *_table_head("| seed | method |", "|---:|---|", label, heads),
    ]
    for r in report["runs"]:
        cells = [_pct(r[k]) for k in (*TEACHER_METRICS, *HEAD_METRICS)]
        lines.append(f"| {r['seed']} | {METHOD_LABEL[r['method']]} | " + " | ".join(cells) + f" | {r['time_s']:.1f} |")
    lines += [
        "",
        "## Per method: mean ± standard deviation over seeds",
        "",
        *_table_head("| method | seeds |", "|---|---:|", label, heads),
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
