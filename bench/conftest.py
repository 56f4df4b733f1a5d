"""Benchmark session set-up and the summary table written at the end of ``pytest bench/``."""

import json
import os
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

RESULTS = Path(__file__).parent / "results"


def _rows(session):
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is None:
        return []
    rows = []
    for bench in bench_session.benchmarks:
        stats = getattr(bench, "stats", None)
        if stats is None or not getattr(stats, "data", None):
            continue
        info = dict(bench.extra_info)
        rows.append({"group": bench.group or "", "name": bench.name, "median_s": stats.median, **info})
    baselines = {r["group"]: r["median_s"] for r in rows if r.get("baseline")}
    for r in rows:
        base = baselines.get(r["group"])
        # ratio > 1: faster than the group's baseline (speed-up).
        r["speedup_vs_baseline"] = base / r["median_s"] if base and r["median_s"] else None
    return sorted(rows, key=lambda r: (r["group"], not r.get("baseline"), r["median_s"]))


def _table(rows):
    lines = [
        "| group | provider | median | speed-up vs baseline | device |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["speedup_vs_baseline"]
        lines.append(
            f"| {r['group']} | {r.get('provider', r['name'])}{' (baseline)' if r.get('baseline') else ''} "
            f"| {r['median_s'] * 1e6:.1f} us | {'' if ratio is None else f'{ratio:.2f}x'} | {r.get('device', '')} |"
        )
    return "\n".join(lines)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Each saved figure also carries its speed-up against its group's baseline from the same run."""
    baselines = {b["group"]: b["stats"]["median"] for b in output_json["benchmarks"] if b["extra_info"].get("baseline")}
    for b in output_json["benchmarks"]:
        base = baselines.get(b["group"])
        b["extra_info"]["speedup_vs_baseline"] = base / b["stats"]["median"] if base else None


def pytest_sessionfinish(session, exitstatus):
    rows = _rows(session)
    if not rows:
        return
    RESULTS.mkdir(exist_ok=True)
    table = _table(rows)
    (RESULTS / "latest.md").write_text(table + "\n")
    (RESULTS / "latest.json").write_text(json.dumps(rows, indent=1, default=str))
    session.config._teskd_summary = table


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    table = getattr(config, "_teskd_summary", None)
    if table:
        terminalreporter.write_sep("=", "teskd_fast benchmark summary (bench/results/latest.md)")
        terminalreporter.write_line(table)
