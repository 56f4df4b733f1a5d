"""The comparison's report: each run's figures, the statistics over seeds (per arm; each arm against the
reference, paired by seed, Holm-adjusted across the comparisons; the cost), compare.json and compare.md."""

from __future__ import annotations

import json
import math
from typing import Any

from teskd_fast.train.checkpoint import atomic_write_text
from teskd_fast.train.compare.options import NOT_COMPARED, CompareError, Comparison, Run, arm_label, config_record
from teskd_fast.train.compare.plot import plot_report
from teskd_fast.train.config import METHODS, TrainConfig, config_differences, resolve
from teskd_fast.train.metrics import read_metrics
from teskd_fast.train.stats import holm, mean, paired_difference, paired_p_value, std

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
COST_METRICS = ("time_s", "images_per_s", "device_hours")
# What makes two runs of a seed start from the same teacher weights (build_model: the seed and the network), and
# see the same batches in the same order (the loaders: the seed, the dataset and the batch size).
SAME_WEIGHTS = ("arch", "stem", "formulation", "width", "dataset")
SAME_ORDER = ("dataset", "batch_size")
SAME_IMAGES = (*SAME_ORDER, "cutmix_alpha", "cutmix_prob", "image_size", "image_size_start", "progressive_end")
LEVEL = 0.05


def best_after_epoch(cmp: Comparison) -> int:
    """The epoch after which the reference's rule takes the best teacher top-1: the reference arm's."""
    ref = next(r.cfg for r in cmp.runs if r.arm == cmp.reference)
    return round(ref.report_after * ref.epochs)


def read_run(run: Run, after: int | None = None) -> dict[str, Any]:
    """A finished run's figures, from its metrics.jsonl (the per-epoch rows that teskd-train wrote).

    ``after``: the best teacher top-1 is taken after this epoch (default: the run's own ``report_after``)."""
    try:
        rows = read_metrics(run.folder)
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"cannot read the metrics of {run.folder}: {e}", 1) from None
    epochs = [r.get("epoch") for r in rows]
    if epochs != list(range(1, run.cfg.epochs + 1)):
        raise CompareError(f"{run.folder}/metrics.jsonl holds epochs {epochs}, not 1..{run.cfg.epochs}; "
                           "the run folder is incomplete", 1)
    if after is None:
        after = round(run.cfg.report_after * run.cfg.epochs)
    # The reference's rule, as teskd-train's summary.json: the best teacher top-1 after epoch `after`.
    late = [r for r in rows if r["epoch"] > after] or rows
    last = rows[-1]
    result: dict[str, Any] = {
        "seed": run.seed, "arm": run.arm, "method": run.method, "run": run.name, "epochs": run.cfg.epochs,
        "teacher_top1_last": last["val_top1_teacher"],
        "teacher_top1_best_after": max(r["val_top1_teacher"] for r in late),
    }
    for key in HEAD_METRICS:
        result[key] = last.get("val_top1_" + key[: -len("_top1")])
    result["time_s"] = math.fsum(r.get("epoch_time", 0.0) for r in rows)
    # Images per second of training (evaluation aside): every epoch's images over every epoch's training time.
    timed = [r for r in rows if "images_per_s" in r and "train_time" in r]
    train_time = math.fsum(r["train_time"] for r in timed)
    result["images_per_s"] = (math.fsum(r["images_per_s"] * r["train_time"] for r in timed) / train_time
                              if timed and train_time > 0 else None)
    # Device hours: the run's time on each of its processes (one per GPU, or per CPU process); 1 when unrecorded.
    result["processes"] = last.get("processes", 1)
    result["device_hours"] = result["time_s"] * result["processes"] / 3600.0
    result["curve"] = [r["val_top1_teacher"] for r in rows]
    return result


def _finite(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _finite(v) if isinstance(v, float) else v for k, v in d.items()}


def shares(reference: TrainConfig, cfg: TrainConfig) -> dict[str, Any]:
    """What a run shares with the reference arm's run of its seed, and the fields it differs in."""
    a, b = reference.to_dict(), cfg.to_dict()

    def differ(names):
        return [n for n in names if a[n] != b[n]]

    return {"teacher_weights": differ(SAME_WEIGHTS), "data_order": differ(SAME_ORDER),
            "images": differ(SAME_IMAGES),
            "differs_in": [d.split(" ", 1)[0] for d in config_differences(a, b, frozenset({"out", "resume"}))]}


def verdict_words(ref: str, arm: str, d: dict[str, Any]) -> str:
    """The Holm-adjusted verdict of ``ref`` against ``arm`` in words."""
    if d["n"] < 2:
        return f"{arm_label(ref)} against {arm_label(arm)}: one seed, no test (it needs at least 2 seeds)"
    if d["p_holm"] < LEVEL:
        better = "better" if d["mean"] > 0 else "worse"
        return f"{arm_label(ref)} {better} than {arm_label(arm)} at 95% with {d['n']} seeds"
    return f"{arm_label(ref)} not distinguishable from {arm_label(arm)} at 95% with {d['n']} seeds"


def summarise(cmp: Comparison, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The report as a JSON-ready dict: per run; per arm (mean, std); each arm against the reference (paired, with
    Holm's adjustment across the arms); the cost; what the arms share; the paper's figures."""
    after, ref = best_after_epoch(cmp), cmp.reference
    by = {a: [r for r in results if r["arm"] == a] for a in cmp.arms}
    methods = {}
    for arm, rows in by.items():
        stats = {}
        for key in (*TEACHER_METRICS, *HEAD_METRICS, *COST_METRICS):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                stats[key] = {"mean": mean(values), "std": _finite(std(values)), "n": len(values)}
        methods[arm] = stats
    others = [a for a in cmp.arms if a != ref]
    comparisons: dict[str, dict[str, Any]] = {a: {} for a in others}
    for key in TEACHER_METRICS:
        diffs = [paired_difference([r[key] for r in by[ref]], [r[key] for r in by[a]]) for a in others]
        adjusted = holm([paired_p_value(d) for d in diffs])
        for a, d, p_holm in zip(others, diffs, adjusted):
            row = _plain({**d.to_dict(), "p": paired_p_value(d), "p_holm": p_holm})
            comparisons[a][key] = {**row, "verdict": verdict_words(ref, a, {**row, "p_holm": p_holm})}
    cheapest = min(cmp.arms, key=lambda a: methods[a]["device_hours"]["mean"])
    cost = {}
    for arm in cmp.arms:
        hours = methods[arm]["device_hours"]["mean"] - methods[cheapest]["device_hours"]["mean"]
        gain = methods[arm]["teacher_top1_last"]["mean"] - methods[cheapest]["teacher_top1_last"]["mean"]
        cost[arm] = {"extra_hours": hours, "gain": gain, "gain_per_hour": gain / hours if hours > 0 else None}
    ref_cfg = {r.seed: r.cfg for r in cmp.runs if r.arm == ref}
    first = {r.arm: r for r in cmp.runs if r.seed == cmp.seeds[0]}
    arms = [{"arm": a, "label": arm_label(a), "change": dict(c), "method": first[a].method,
             "shares": shares(ref_cfg[cmp.seeds[0]], first[a].cfg)} for a, c in cmp.arms.items()]
    paper = None
    if cmp.base.preset in PUBLISHED and ref == "teskd" and "baseline" in cmp.arms:
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
        "seeds": list(cmp.seeds), "best_after_epoch": after, "confidence": 0.95, "reference": ref,
        "config": config_record(cmp)["train"], "arms": arms,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results],
        "methods": methods, "comparisons": comparisons,
        # The first comparison's, under the name of the two-arm report (TESKD minus baseline by default).
        "difference": {k: {n: v for n, v in d.items() if n not in ("p", "p_holm", "verdict")}
                       for k, d in comparisons[others[0]].items()},
        "cheapest": cheapest, "cost": cost, "paper": paper,
    }
def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "–"
    x = round(x, 2) + 0.0  # no "-0.00" for a difference of -1e-15
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def _mean_std(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat:
        return "–"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def verdict(d: dict[str, Any], who: str = "TESKD") -> str:
    """Plain words for a paired difference's interval (``who``: the reference arm's label)."""
    if d["n"] < 2:
        return "one seed: no interval (it needs at least 2 seeds)"
    if d["contains_zero"]:
        return f"the interval contains 0: no significant difference over {d['n']} seeds"
    better = "better" if d["mean"] > 0 else "worse"
    return f"the interval excludes 0: {who} is {better} over {d['n']} seeds"


def _table_head(first: str, first_rule: str, label: dict[str, str], heads: list[str], last: list[str]) -> list[str]:
    """A results table's header and rule: the first columns, the two teacher columns, the heads, the last ones."""
    return [f"{first} {label['teacher_top1_last']} | {label['teacher_top1_best_after']} | " + " | ".join(heads)
            + " | " + " | ".join(last) + " |", first_rule + "---:|---:|" + "---:|" * (len(heads) + len(last))]


def _shared(share: dict[str, Any], what: str) -> str:
    return "same" if not share[what] else "differ (" + ", ".join(share[what]) + ")"


def _change(change: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in change.items())


def render_markdown(report: dict[str, Any]) -> str:
    """compare.md: the arms, the per-seed and per-arm tables (with the paper's rows), each paired difference against
    the reference with its Holm-adjusted verdict, and the cost."""
    after, ref = report["best_after_epoch"], report["reference"]
    label = {"teacher_top1_last": "teacher (last epoch)",
             "teacher_top1_best_after": f"teacher (best after epoch {after})"}
    heads = [k[: -len("_top1")] for k in HEAD_METRICS]
    seeds = ", ".join(str(s) for s in report["seeds"])
    n = len(report["seeds"])
    arms = report["arms"]
    others = [a["arm"] for a in arms if a["arm"] != ref]
    lines = [
        f"# {arm_label(ref)} against {', '.join(map(arm_label, others))}: {report['preset']}, {n} "
        f"seed{'s' if n > 1 else ''}",
        "",
        f"{report['arch']} (width {report['width']:g}) on {report['dataset']}, {report['epochs']} epochs, seeds "
        f"{seeds}; the reference arm is {arm_label(ref)}. Test top-1 (%): the teacher at the last epoch and by the "
        f"reference's rule (the best after epoch {after} of the reference arm); the students and the ensemble at "
        "the last epoch. Time: the run's epochs (training and evaluation); images/s: training images per second; "
        "device hours: the time times the run's processes (GPUs, or CPU processes); all from metrics.jsonl.",
        "",
        "## Arms and what they share with the reference, seed by seed",
        "",
        "| arm | change to the shared configuration | initial teacher weights | data order | training images "
        "| differs from the reference in |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        sh = a["shares"]
        lines.append(f"| {a['label']} | {_change(a['change'])} | {_shared(sh, 'teacher_weights')} | "
                     f"{_shared(sh, 'data_order')} | {_shared(sh, 'images')} | "
                     f"{', '.join(sh['differs_in']) or '–'} |")
    lines += ["", "## Per seed", "",
              *_table_head("| seed | arm |", "|---:|---|", label, heads, ["time (s)", "images/s"])]
    for r in report["runs"]:
        cells = [_pct(r[k]) for k in (*TEACHER_METRICS, *HEAD_METRICS)]
        ips = "–" if r.get("images_per_s") is None else f"{r['images_per_s']:.0f}"
        lines.append(f"| {r['seed']} | {arm_label(r['arm'])} | " + " | ".join(cells) + f" | {r['time_s']:.1f} | "
                     f"{ips} |")
    lines += ["", "## Per arm: mean ± standard deviation over seeds", "",
              *_table_head("| arm | seeds |", "|---|---:|", label, heads, ["time (s)", "images/s", "device hours"])]
    for a, stats in report["methods"].items():
        cells = [_mean_std(stats.get(k)) for k in (*TEACHER_METRICS, *HEAD_METRICS)]
        lines.append(f"| {arm_label(a)} (ours) | {n} | " + " | ".join(cells)
                     + f" | {_mean_std(stats.get('time_s'), 1)} | {_mean_std(stats.get('images_per_s'), 0)} | "
                     f"{_mean_std(stats.get('device_hours'), 4)} |")
    paper = report["paper"]
    if paper:
        for m in METHODS:
            cells = [_pct(paper[m]) if k == paper["metric"] else "–" for k in (*TEACHER_METRICS, *HEAD_METRICS)]
            lines.append(f"| {arm_label(m)} (paper's figure) | 1 | " + " | ".join(cells) + " | – | – | – |")
    lines += [
        "",
        f"## {arm_label(ref)} minus each arm, paired by seed",
        "",
        "The mean of the per-seed differences, their standard deviation, the 95% confidence interval "
        "mean ± t(0.975, n-1) · std / √n (Student's t on the paired differences), the paired t-test's two-sided "
        f"p-value and that p adjusted by Holm's method across the {len(others)} comparison"
        f"{'s' if len(others) > 1 else ''} of this table's metric; the verdict is the adjusted one, at 95%.",
    ]
    for a in others:
        lines += ["", f"### {arm_label(ref)} minus {arm_label(a)}", "",
                  "| teacher top-1 | mean difference | std | 95% interval | t(0.975, n-1) | interval | p | Holm p "
                  "| verdict (Holm-adjusted) |", "|---|---:|---:|---:|---:|---|---:|---:|---|"]
        for key in TEACHER_METRICS:
            d = report["comparisons"][a][key]
            ci = f"[{_pct(d['low'], True)}, {_pct(d['high'], True)}]" if d["n"] >= 2 else "–"
            t = f"{d['t_critical']:.3f}" if d["n"] >= 2 else "–"
            p = "–" if d["p"] is None else f"{d['p']:.3f}"
            ph = "–" if d["p_holm"] is None else f"{d['p_holm']:.3f}"
            lines.append(f"| {label[key]} (ours) | {_pct(d['mean'], True)} | {_pct(d['std'])} | {ci} | {t} | "
                         f"{verdict(d, arm_label(ref))} | {p} | {ph} | {d['verdict']} |")
        if paper and a == "baseline":
            lines.append(f"| {paper['label']} (paper's figure) | {_pct(paper['difference'], True)} | – | – | – "
                         f"| one run per method: no interval | – | – | – |")
    lines += ["", "## Cost", "",
              f"Against the cheapest arm ({arm_label(report['cheapest'])}, by device hours per run): the extra "
              "device hours per run, the teacher's last-epoch top-1 gained (mean over seeds), and the points gained "
              "per extra device hour.", "",
              "| arm | device hours per run | teacher top-1 (last epoch) | extra hours | points gained | points per "
              "extra hour |", "|---|---:|---:|---:|---:|---:|"]
    for a, c in report["cost"].items():
        stats = report["methods"][a]
        per_hour = "– (the cheapest)" if a == report["cheapest"] else (
            "–" if c["gain_per_hour"] is None else f"{c['gain_per_hour']:+.1f}")
        lines.append(f"| {arm_label(a)} | {stats['device_hours']['mean']:.4f} | "
                     f"{_mean_std(stats['teacher_top1_last'])} | {c['extra_hours']:+.4f} | {c['gain']:+.2f} | "
                     f"{per_hour} |")
    if paper:
        lines += ["", f"The paper's figures: {paper['source']}; its {paper['label']}, shown in the column of "
                  "that rule."]
        if paper["recipe_changes"]:
            lines[-1] += (f" This comparison changes the published recipe ({', '.join(paper['recipe_changes'])}): "
                          "its figures and the paper's are not like for like.")
    return "\n".join(lines) + "\n"


def write_report(cmp: Comparison) -> dict[str, Any]:
    """Read every run, write OUT/compare.json, compare.md and compare.png; return the report."""
    after = best_after_epoch(cmp)
    results = [read_run(run, after) for run in cmp.runs]
    report = summarise(cmp, results)
    atomic_write_text(cmp.out / "compare.json", json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    atomic_write_text(cmp.out / "compare.md", markdown)
    if cmp.base.plot:
        try:
            plot_report(report, results, cmp.out / "compare.png")
        except ImportError as e:
            print(f"teskd-compare: no compare.png (matplotlib is needed: pip install matplotlib): {e}")
    print("\n" + markdown)
    print(f"teskd-compare: wrote {cmp.out / 'compare.md'}, compare.json"
          + (", compare.png" if cmp.base.plot else ""))
    return report
