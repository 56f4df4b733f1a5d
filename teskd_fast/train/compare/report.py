"""The comparison's report: each run's figures, the statistics over seeds (per arm; each arm against the
reference, paired by seed, Holm-adjusted across the comparisons; the cost), compare.json and compare.md."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from teskd_fast.train.checkpoint import atomic_write_text
from teskd_fast.train.compare.options import NOT_COMPARED, CompareError, Comparison, Run, arm_label, config_record
from teskd_fast.train.compare.plot import plot_report
from teskd_fast.train.config import METHODS, TrainConfig, config_differences, resolve
from teskd_fast.train.exit_status import DATA
from teskd_fast.train.metrics import read_metrics
from teskd_fast.train.report import finished
from teskd_fast.train.stats import clip, has_spread, holm, mean, mean_interval, paired_difference, paired_p_value, std

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
# A verdict needs at least this many paired seeds: with 2, t(0.975, 1) is 12.7 and one image's worth of noise on
# a small test set passes for an effect.
MIN_SEEDS_FOR_VERDICT = 3
# The primary figure, the one the verdicts and the cost are about: the teacher at the last epoch. The best epoch
# after report_after is chosen on the test set itself (optimistic): shown as the published code's measure only.
PRIMARY = "teacher_top1_last"
# An accuracy in %, and a difference of two.
ACCURACY, DIFFERENCE = (0.0, 100.0), (-100.0, 100.0)


def best_after_epoch(cmp: Comparison) -> int:
    """The epoch after which the reference's rule takes the best teacher top-1: the reference arm's."""
    ref = next(r.cfg for r in cmp.runs if r.arm == cmp.reference)
    return round(ref.report_after * ref.epochs)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_run(run: Run, after: int | None = None) -> dict[str, Any]:
    """A finished run's figures, from its metrics.jsonl (the per-epoch rows that teskd-train wrote).

    ``after``: the best teacher top-1 is taken after this epoch (default: the run's own ``report_after``).

    Raises:
        CompareError: (status 1) naming the run's file: metrics.jsonl missing, unreadable (a line cut short or
            not a JSON row), without every epoch, or holding a value the report uses that is not a finite number
            (a NaN accuracy): such a run's figures are not used.
    """
    path = run.folder / "metrics.jsonl"
    try:
        rows = read_metrics(run.folder)
    except (OSError, ValueError) as e:
        raise CompareError(str(e), DATA) from None  # it names the file
    epochs = [r.get("epoch") for r in rows]
    if epochs != list(range(1, run.cfg.epochs + 1)):
        raise CompareError(f"{path} holds epochs {epochs}, not 1..{run.cfg.epochs}; the run folder is incomplete", DATA)
    for r in rows:
        used = [k for k in r if k.startswith("val_top1_") or k in ("epoch_time", "train_time", "images_per_s",
                                                                     "processes")]
        for key in {"val_top1_teacher", *used}:
            if not _number(r.get(key)):
                raise CompareError(f"{path}: epoch {r['epoch']}: {key} is {r.get(key)!r}, not a finite number; the "
                                   "run's figures are not used", DATA)
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


def unfinished(run: Run) -> str | None:
    """Why ``run`` is not finished (its summary.json missing, of other epochs, or a file it lists missing), or
    None when it is: the report leaves an unfinished run out, as a rerun would continue it."""
    if finished(run.folder, run.cfg.epochs):
        return None
    summary = run.folder / "summary.json"
    if not summary.is_file():
        return f"{summary}: missing: the run is unfinished (run the comparison's command again to finish it)"
    return (f"{summary}: not the summary of a finished {run.cfg.epochs}-epoch run with every file it lists: the run "
            "is unfinished (run the comparison's command again to finish it)")


def read_runs(cmp: Comparison, after: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every run's figures (:func:`read_run`) and the runs left out: unfinished, or with metrics unreadable or
    not finite, each with the reason naming its file."""
    results, left_out = [], []
    for run in cmp.runs:
        try:
            problem = unfinished(run)
            if problem is None:
                results.append(read_run(run, after))
        except CompareError as e:
            problem = str(e)
        if problem is not None:
            left_out.append({"run": run.name, "arm": run.arm, "seed": run.seed, "problem": problem})
    return results, left_out


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
    """The Holm-adjusted verdict of ``ref`` against ``arm`` in words, or why there is none: fewer than
    :data:`MIN_SEEDS_FOR_VERDICT` paired seeds, or differences that do not vary (nothing to test them against)."""
    n = d["n"]
    if n < MIN_SEEDS_FOR_VERDICT:
        return (f"no verdict: {n} paired seed{'' if n == 1 else 's'} (a verdict needs at least "
                f"{MIN_SEEDS_FOR_VERDICT})")
    if not d["spread"]:
        return (f"no verdict: the difference is {_pct(d['mean'], True)} on every one of the {n} seeds, no spread to "
                "test it against (a small test set's resolution, or runs that do not differ)")
    if d["p_holm"] < LEVEL:
        better = "better" if d["mean"] > 0 else "worse"
        return f"{arm_label(ref)} {better} than {arm_label(arm)} at 95% with {n} seeds"
    return f"{arm_label(ref)} not distinguishable from {arm_label(arm)} at 95% with {n} seeds"


# The best epoch after report_after: no test is made of it.
NOT_TESTED = "none: the epoch is chosen on the test set (the published code's measure; optimistic)"
# A recipe's fields, printed in the report: what every arm shares unless its change says otherwise.
RECIPE = ("epochs", "batch_size", "lr", "schedule", "lr_milestones", "lr_gamma", "warmup_epochs", "momentum",
          "nesterov", "weight_decay", "bn_weight_decay", "label_smoothing", "image_size", "image_size_start",
          "val_image_size", "val_resize", "precision")


def _stats(values: list[float], bounds: tuple[float, float] | None) -> dict[str, Any]:
    """Mean, sample std and count; for an accuracy (``bounds``) the mean's 95% interval too, inside them."""
    stat: dict[str, Any] = {"mean": mean(values), "std": _finite(std(values)), "n": len(values)}
    if bounds is not None:
        interval = mean_interval(values, 0.95, bounds)
        stat["low"], stat["high"] = interval if interval else (None, None)
    return stat


def _comparison(d, p: float, p_holm: float, seeds: list[int]) -> dict[str, Any]:
    """One paired difference as a JSON-ready row: its interval inside [-100, 100] (a difference of accuracies)."""
    if d is None:
        return {"n": 0, "seeds": [], "mean": None, "std": None, "sem": None, "t_critical": None, "confidence": 0.95,
                "low": None, "high": None, "contains_zero": None, "p": None, "p_holm": None, "spread": False}
    row = _plain({**d.to_dict(), "p": p, "p_holm": p_holm, "spread": has_spread(d), "seeds": seeds})
    if row["low"] is not None:
        row["low"], row["high"] = clip((row["low"], row["high"]), DIFFERENCE)
    return row


def _time_noise(a: dict[str, Any], cheapest: dict[str, Any]) -> float:
    """The extra device hours below which an arm's extra time is not told from noise: 5% of the cheapest arm's
    hours, or two standard errors of the difference of the two means, whichever is larger."""
    se2 = sum((s["std"] or 0.0) ** 2 / s["n"] for s in (a, cheapest))
    return max(0.05 * cheapest["mean"], 2.0 * math.sqrt(se2))


def summarise(cmp: Comparison, results: list[dict[str, Any]], left_out: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """The report as a JSON-ready dict: per run; per arm (mean, std); each arm against the reference (paired by
    seed over the seeds where both runs are usable, with Holm's adjustment across the arms, a verdict from the
    last epoch only); the cost; what the arms share; the shared recipe; the paper's figures; the runs left out."""
    after, ref = best_after_epoch(cmp), cmp.reference
    by = {a: [r for r in results if r["arm"] == a] for a in cmp.arms}
    methods = {}
    for arm, rows in by.items():
        stats = {}
        for key in (*TEACHER_METRICS, *HEAD_METRICS, *COST_METRICS):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                stats[key] = _stats(values, ACCURACY if key in (*TEACHER_METRICS, *HEAD_METRICS) else None)
        methods[arm] = stats
    others = [a for a in cmp.arms if a != ref]
    value = {(r["arm"], r["seed"]): r for r in results}
    paired = {a: [s for s in cmp.seeds if (ref, s) in value and (a, s) in value] for a in others}
    comparisons: dict[str, dict[str, Any]] = {a: {} for a in others}
    for key in TEACHER_METRICS:
        diffs = [paired_difference([value[ref, s][key] for s in paired[a]], [value[a, s][key] for s in paired[a]])
                 if paired[a] else None for a in others]
        if key == PRIMARY:
            ps = [paired_p_value(d) if d else math.nan for d in diffs]
            adjusted = holm(ps)
        else:
            ps = adjusted = [math.nan] * len(others)
        for a, d, p, p_holm in zip(others, diffs, ps, adjusted, strict=True):
            row = _comparison(d, p, p_holm, paired[a])
            comparisons[a][key] = {**row, "verdict": verdict_words(ref, a, row) if key == PRIMARY else NOT_TESTED}
    hours = {a: methods[a]["device_hours"] for a in cmp.arms if "device_hours" in methods[a]}
    cheapest = min(hours, key=lambda a: hours[a]["mean"]) if hours else None
    cost = {}
    for arm in hours:
        extra, noise = hours[arm]["mean"] - hours[cheapest]["mean"], _time_noise(hours[arm], hours[cheapest])
        gain = (methods[arm][PRIMARY]["mean"] - methods[cheapest][PRIMARY]["mean"]
                if PRIMARY in methods[arm] and PRIMARY in methods[cheapest] else None)
        # No rate where the extra time is within its noise: a gain over a near-zero time is a meaningless number.
        rate = gain / extra if gain is not None and arm != cheapest and extra > noise else None
        cost[arm] = {"extra_hours": extra, "gain": gain, "gain_per_hour": rate, "noise_hours": noise}
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
        "primary": PRIMARY, "min_seeds_for_verdict": MIN_SEEDS_FOR_VERDICT,
        "recipe": {k: cfg.to_dict()[k] for k in RECIPE},
        "config": config_record(cmp)["train"], "arms": arms,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in results],
        "left_out": list(left_out),
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


def _table_head(first: str, first_rule: str, label: dict[str, str], heads: list[str], last: list[str]) -> list[str]:
    """A results table's header and rule: the first columns, the two teacher columns, the heads, the last ones."""
    return [f"{first} {label['teacher_top1_last']} | {label['teacher_top1_best_after']} | " + " | ".join(heads)
            + " | " + " | ".join(last) + " |", first_rule + "---:|---:|" + "---:|" * (len(heads) + len(last))]


def _shared(share: dict[str, Any], what: str) -> str:
    return "same" if not share[what] else "differ (" + ", ".join(share[what]) + ")"


def _change(change: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in change.items())


def recipe_words(recipe: dict[str, Any]) -> str:
    """The shared recipe in one line: lr, batch, schedule, momentum, weight decay, epochs, image size, precision."""
    sched = recipe["schedule"]
    if sched == "multistep":
        sched += (f" (x{recipe['lr_gamma']:g} at " + ", ".join(f"{m:g}" for m in recipe["lr_milestones"])
                  + " of the epochs)")
    if recipe["warmup_epochs"]:
        sched += f", {recipe['warmup_epochs']:g}-epoch linear warm-up"
    size = f"image size {recipe['image_size']}"
    if recipe["image_size_start"]:
        size = f"image size {recipe['image_size_start']} -> {recipe['image_size']} (progressive)"
    size += f", test {recipe['val_image_size']}" + (f" (resized to {recipe['val_resize']})"
                                                    if recipe["val_resize"] != recipe["val_image_size"] else "")
    return (f"lr {recipe['lr']:g} (global batch {recipe['batch_size']}), schedule {sched}, SGD momentum "
            f"{recipe['momentum']:g}{' Nesterov' if recipe['nesterov'] else ''}, weight decay "
            f"{recipe['weight_decay']:g}{'' if recipe['bn_weight_decay'] else ' (not on BatchNorm and biases)'}, "
            f"label smoothing {recipe['label_smoothing']:g}, {recipe['epochs']} epochs, {size}, precision "
            f"{recipe['precision']}")


def _interval(d: dict[str, Any]) -> str:
    return f"[{_pct(d['low'], True)}, {_pct(d['high'], True)}]" if d["low"] is not None else "–"


def render_markdown(report: dict[str, Any]) -> str:
    """compare.md: the recipe, the arms, the per-seed and per-arm tables (with the paper's rows), each paired
    difference against the reference with its Holm-adjusted verdict (the last epoch's), the cost, the runs left
    out."""
    after, ref = report["best_after_epoch"], report["reference"]
    label = {"teacher_top1_last": "teacher (last epoch)",
             "teacher_top1_best_after": f"teacher (best after epoch {after}, chosen on the test set)"}
    heads = [k[: -len("_top1")] for k in HEAD_METRICS]
    seeds = ", ".join(str(s) for s in report["seeds"])
    n = len(report["seeds"])
    arms = report["arms"]
    others = [a["arm"] for a in arms if a["arm"] != ref]
    left_out = report["left_out"]
    lines = [
        f"# {arm_label(ref)} against {', '.join(map(arm_label, others))}: {report['preset']}, {n} "
        f"seed{'s' if n > 1 else ''}",
        "",
        f"{report['arch']} (width {report['width']:g}) on {report['dataset']}, {report['epochs']} epochs, seeds "
        f"{seeds}; the reference arm is {arm_label(ref)}. Test top-1 (%): the teacher at the last epoch (the "
        "primary figure: the verdicts and the cost are about it), the students and the ensemble at the last epoch; "
        f"beside them, the published code's measure, the teacher's best after epoch {after} of the reference arm: "
        "that epoch is chosen on the test set itself, so the figure is optimistic and no verdict is drawn from it. "
        "Time: the run's epochs (training and evaluation); images/s: training images per second; device hours: the "
        "time times the run's processes (GPUs, or CPU processes); all from metrics.jsonl.",
        "",
        f"The recipe every arm shares (unless its change below says otherwise): {recipe_words(report['recipe'])}.",
    ]
    if left_out:
        lines += ["", f"**{len(left_out)} run{'s' if len(left_out) > 1 else ''} left out** (unfinished, or metrics "
                  "that cannot be used; listed at the end): the figures below are over the other runs, and each "
                  "difference over the seeds where both runs are usable."]
    lines += [
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
              "The last-epoch teacher's 95% interval of the mean (Student's t, inside [0, 100]) is in compare.json "
              "and compare.png.", "",
              *_table_head("| arm | seeds |", "|---|---:|", label, heads, ["time (s)", "images/s", "device hours"])]
    for a, stats in report["methods"].items():
        cells = [_mean_std(stats.get(k)) for k in (*TEACHER_METRICS, *HEAD_METRICS)]
        used = stats[PRIMARY]["n"] if PRIMARY in stats else 0
        lines.append(f"| {arm_label(a)} (ours) | {used} | " + " | ".join(cells)
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
        "mean ± t(0.975, n-1) · std / √n (Student's t on the paired differences, inside [-100, 100]), and for the "
        "last epoch the paired t-test's two-sided p-value and that p adjusted by Holm's method across the "
        f"{len(others)} comparison{'s' if len(others) > 1 else ''}; the verdict is the adjusted one, at 95%. No "
        f"verdict is drawn from fewer than {report['min_seeds_for_verdict']} paired seeds (with 2, t(0.975, 1) is "
        "12.7) nor from differences that are the same on every seed (no spread to test them against).",
    ]
    for a in others:
        lines += ["", f"### {arm_label(ref)} minus {arm_label(a)}", "",
                  "| teacher top-1 | mean difference | std | 95% interval | t(0.975, n-1) | p | Holm p "
                  "| verdict (Holm-adjusted) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for key in TEACHER_METRICS:
            d = report["comparisons"][a][key]
            t = "–" if d["t_critical"] is None else f"{d['t_critical']:.3f}"
            p = "–" if d["p"] is None else f"{d['p']:.3f}"
            ph = "–" if d["p_holm"] is None else f"{d['p_holm']:.3f}"
            what = label[key] + (" (ours)" if key == PRIMARY else " (ours; the published code's measure)")
            lines.append(f"| {what} | {_pct(d['mean'], True)} | {_pct(d['std'])} | {_interval(d)} | {t} | {p} | "
                         f"{ph} | {d['verdict']} |")
        if paper and a == "baseline":
            lines.append(f"| {paper['label']} (paper's figure) | {_pct(paper['difference'], True)} | – | – | – | – | "
                         "– | one run per method: no test |")
    lines += ["", "## Cost", "",
              f"Against the cheapest arm ({arm_label(report['cheapest'] or '–')}, by device hours per run): the "
              "extra device hours per run, the teacher's last-epoch top-1 gained (mean over seeds), and the points "
              "gained per extra device hour, given only where the extra time is larger than its noise (5% of the "
              "cheapest arm's hours, or two standard errors of the difference, whichever is larger).", "",
              "| arm | device hours per run | teacher top-1 (last epoch) | extra hours | points gained | points per "
              "extra hour |", "|---|---:|---:|---:|---:|---:|"]
    for a, c in report["cost"].items():
        stats = report["methods"][a]
        if a == report["cheapest"]:
            per_hour = "– (the cheapest)"
        elif c["gain_per_hour"] is None:
            per_hour = "– (the extra time is within its noise)" if c["gain"] is not None else "–"
        else:
            per_hour = f"{c['gain_per_hour']:+.1f}"
        lines.append(f"| {arm_label(a)} | {stats['device_hours']['mean']:.4f} | "
                     f"{_mean_std(stats.get(PRIMARY))} | {c['extra_hours']:+.4f} | {_pct(c['gain'], True)} | "
                     f"{per_hour} |")
    if paper:
        lines += ["", f"The paper's figures: {paper['source']}; its {paper['label']}, shown in the column of "
                  "that rule."]
        if paper["recipe_changes"]:
            lines[-1] += (f" This comparison changes the published recipe ({', '.join(paper['recipe_changes'])}): "
                          "its figures and the paper's are not like for like.")
    if left_out:
        lines += ["", "## Runs left out", "", "| run | why |", "|---|---|"]
        lines += [f"| {r['run']} | {r['problem'].replace('|', '/').replace(chr(10), ' ')} |" for r in left_out]
    return "\n".join(lines) + "\n"


def write_report(cmp: Comparison) -> dict[str, Any]:
    """Read every run, write OUT/compare.json, compare.md and compare.png; return the report. A run that is
    unfinished or whose metrics cannot be used is left out of the figures, named in the report and in one line
    on stderr (its ``left_out``: the command then exits with status 1)."""
    after = best_after_epoch(cmp)
    results, left_out = read_runs(cmp, after)
    report = summarise(cmp, results, left_out)
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
    for r in left_out:
        print(f"teskd-compare: {r['run']} left out of the report: {r['problem']}", file=sys.stderr)
    return report
