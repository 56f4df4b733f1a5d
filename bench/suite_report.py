"""The GPU suite's bookkeeping (``bench/gpu_suite.sh``): its environment record, its report, and its checker.

Usage::

    python bench/suite_report.py env WORK           # WORK/env.json: card, driver, versions, date, command
    python bench/suite_report.py report WORK OUT     # OUT/summary.md, OUT/results.json, OUT/logs.tar.gz
    python bench/suite_report.py check OUT [--dry-run]   # what CI checks of a finished suite's OUT folder

WORK is the suite's scratch folder: ``stages.jsonl`` (one line per finished stage, written by the shell script),
``env.json``, ``STAGE.xml`` (pytest's JUnit report of a test or benchmark stage), ``STAGE.bench.json``
(pytest-benchmark's figures), ``e2e.json`` (the end-to-end run's figures) and ``logs/``. ``report`` is run after
every stage, so that OUT always holds what the stages so far found; each file is replaced atomically.
"""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

# The files OUT may hold: only eight files come back from the GPU machine.
OUT_FILES = ("summary.md", "results.json", "logs.tar.gz")
MAX_OUT_FILES = 8
MAX_ARCHIVE_BYTES = 15 * 2**20
# Left out of the logs archive: checkpoints and the end-to-end stage's dataset (large, and of no use to a reader).
_ARCHIVE_SKIP = (".pt", ".tar.gz")
_ARCHIVE_SKIP_DIRS = ("e2e/data", "src")


def _atomic_write(path, data):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


# ---------------------------------------------------------------------------------------------------------- env
def _run(cmd):
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"
    return done.stdout.strip() or done.stderr.strip() or f"exit {done.returncode}"


def environment(command):
    """Card, driver, versions, date and command of this run, as a dict."""
    info = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
    }
    import torch

    info["torch"] = torch.__version__
    info["cuda_runtime"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA)"
    if torch.cuda.is_available():
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    # Versions read from the installed metadata: importing timm, DALI or scikit-learn would cost seconds.
    for name in ("triton", "torchvision", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "timm", "matplotlib",
                 "scikit-learn", "pytest", "pytest-xdist", "pytest-benchmark", "pytest-timeout", "numpy"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = None
    import teskd_fast

    info["teskd_fast"] = str(Path(teskd_fast.__file__).parent)
    info["install"] = os.environ.get("GPU_SUITE_INSTALL", "")
    return info


# ------------------------------------------------------------------------------------------------------ parsing
def junit_counts(path):
    """Counts (passed, failed, errors, skipped), the failures (name, first message line) and skip reasons."""
    counts = Counter()
    failures, skips = [], Counter()
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failed" if "failure" in kinds else "errors"
            counts[tag] += 1
            message = (kinds[tag[:-1] if tag == "errors" else "failure"].get("message") or "").strip()
            failures.append({"test": name, "kind": tag, "message": message.splitlines()[0][:300] if message else ""})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = (kinds["skipped"].get("message") or "").strip()
            skips[reason[:200]] += 1
        else:
            counts["passed"] += 1
    return {"counts": dict(counts), "failures": failures, "skip_reasons": dict(skips.most_common())}


def bench_rows(path):
    """The figures of a pytest-benchmark JSON: group, provider, median, the group's baseline, speed-up."""
    data = _read_json(path)
    if not data:
        return []
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        rows.append({
            "group": b.get("group") or "", "provider": info.get("provider", b.get("name")),
            "baseline": bool(info.get("baseline")), "median_s": b["stats"]["median"],
            "speedup_vs_baseline": info.get("speedup_vs_baseline"),
            "extra": {k: info[k] for k in ("images_per_s", "peak_step_mib", "loss_backend", "optimizer",
                                           "decode_fallbacks", "cpu_decoded_images", "fxgraph_cache", "dtype",
                                           "device") if k in info},
        })
    baselines = {r["group"]: r["median_s"] for r in rows if r["baseline"]}
    for r in rows:
        r["baseline_median_s"] = baselines.get(r["group"])
    return sorted(rows, key=lambda r: (r["group"], not r["baseline"], r["median_s"]))


# ------------------------------------------------------------------------------------------------------- report
def _tail(path, lines=12):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:300] for line in text if not line.startswith("WARNING: Location")][-lines:]


def _lines(path):
    try:
        return [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError:
        return []


def collect(work):
    work = Path(work)
    planned = _read_json(work / "plan.json", {})
    done = {}
    if (work / "stages.jsonl").exists():
        for line in (work / "stages.jsonl").read_text().splitlines():
            if line.strip():
                stage = json.loads(line)
                done[stage["name"]] = stage
    try:
        running = (work / "running").read_text().strip()
    except OSError:
        running = None
    stages = []
    background = set(planned.get("background", []))
    warm = done.get("warmup")
    warm_end = warm["start"] + warm["seconds"] if warm and "start" in warm else None
    for name in planned.get("stages", list(done)):
        stage = dict(done.get(name, {"name": name, "status": "not run"}))
        if name == "warmup":
            stage["graphs"] = [json.loads(line) for line in _lines(work / "warmup.jsonl")]
        if name in done and name not in background and "start" in stage and stage["start"] is not None:
            # A stage that started before the background warm-up ended shared the machine with its compiles.
            stage["beside_warmup"] = warm_end is None or stage["start"] < warm_end
        if name in background and name not in done:
            stage["status"] = "running in the background"
            stage["why"] = "still running when this report was written (or stopped with the suite)"
        elif name in done:
            rc = stage["rc"]
            stage["status"] = "cut off at its cap" if rc in (124, 137) else ("ok" if rc == 0 else f"failed (exit {rc})")
            if rc != 0:
                stage["log_tail"] = _tail(work / "logs" / f"{name}.log")
            junit = junit_counts(work / f"{name}.xml")
            if junit is not None:
                stage["tests"] = junit
            rows = bench_rows(work / f"{name}.bench.json")
            if rows:
                stage["benchmarks"] = rows
            if name == "e2e":
                stage["e2e"] = _read_json(work / "e2e.json")
        else:
            stage["why"] = done.get("_why", {}).get("why") or "the suite stopped before it"
            if name == running:
                stage["status"] = "running or stopped in it"
                stage["why"] = "the suite was stopped from outside while this stage ran (or it is running now)"
                stage["log_tail"] = _tail(work / "logs" / f"{name}.log")
        stages.append(stage)
    return {"mode": planned.get("mode", "gpu"), "caps_s": planned.get("caps", {}), "background": sorted(background),
            "cache_dir": planned.get("cache_dir"), "env": _read_json(work / "env.json"), "stages": stages,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _us(seconds):
    return "" if seconds is None else (f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us")


def summary_markdown(results):
    env = results.get("env") or {}
    lines = [f"# teskd_fast GPU suite ({results['mode']})", ""]
    if env:
        lines += [f"- date: {env.get('date')}; command: `{env.get('command')}`",
                  f"- device: {env.get('device')} (capability {env.get('capability', '-')}); nvidia-smi: "
                  f"{env.get('nvidia_smi')}",
                  f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), triton "
                  f"{env.get('triton')}, torchvision {env.get('torchvision')}, DALI "
                  f"{env.get('nvidia-dali-cuda130') or env.get('nvidia-dali-cuda120')}, pytest-xdist "
                  f"{env.get('pytest-xdist')}",
                  f"- teskd_fast from {env.get('teskd_fast')} ({env.get('install') or 'as found'})", ""]
    lines += ["| stage | status | seconds | cap (s) | result |", "|---|---|---|---|---|"]
    for s in results["stages"]:
        result = ""
        if "tests" in s:
            c = s["tests"]["counts"]
            result = ", ".join(f"{c.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped"))
        if "benchmarks" in s:
            result += ("; " if result else "") + f"{len(s['benchmarks'])} figures"
        if s.get("e2e"):
            e = s["e2e"]
            figure = e.get("images_per_s_last_epoch")
            result += (f"{figure:.0f} img/s" if figure is not None else "no epoch finished") + \
                f", teacher top-1 {e.get('teacher_top1')}" + (f"; {e['stopped']}" if e.get("stopped") else "")
        if "graphs" in s:
            result = ", ".join(f"{g['graph']} {'done' if g['ok'] else 'FAILED'} in {g['seconds']} s"
                               for g in s["graphs"]) or "no graph finished"
        if s.get("beside_warmup") and s["name"] in ("loss", "data", "step", "e2e"):
            result += "; ran while the warm-up compiled"
        if s["status"] in ("not run", "running or stopped in it", "running in the background"):
            result = s.get("why", "")
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | "
                     f"{s.get('cap_s', results['caps_s'].get(s['name'], ''))} | {result} |")
    if results.get("cache_dir"):
        lines += ["", f"Compile cache (TORCHINDUCTOR_CACHE_DIR, FX graph and AOTAutograd caches): "
                      f"`{results['cache_dir']}`; the warm-up runs in the background from the end of install."]
    for s in results["stages"]:
        for g in s.get("graphs", []):
            if not g["ok"]:
                lines += ["", f"- warm-up {g['graph']} failed: {g.get('error')}"]
        if s.get("log_tail") and not s.get("tests", {}).get("failures"):
            lines += ["", f"## {s['name']}: {s['status']}, the end of its log", "", "```", *s["log_tail"], "```"]
        if "tests" in s and s["tests"]["failures"]:
            lines += ["", f"## {s['name']}: failures", ""]
            lines += [f"- `{f['test']}` ({f['kind']}): {f['message']}" for f in s["tests"]["failures"][:60]]
            if len(s["tests"]["failures"]) > 60:
                lines.append(f"- ... and {len(s['tests']['failures']) - 60} more (logs.tar.gz: {s['name']}.log)")
        if s.get("benchmarks"):
            lines += ["", f"## {s['name']}: figures (median; speed-up against the group's baseline, same run)", "",
                      "| group | provider | median | baseline median | speed-up | extra |", "|---|---|---|---|---|---|"]
            for r in s["benchmarks"]:
                ratio = r["speedup_vs_baseline"]
                extra = ", ".join(f"{k} {round(v, 1) if isinstance(v, float) else v}" for k, v in r["extra"].items()
                                  if k not in ("device", "dtype"))
                lines.append(f"| {r['group']} | {r['provider']}{' (baseline)' if r['baseline'] else ''} | "
                             f"{_us(r['median_s'])} | {_us(r['baseline_median_s'])} | "
                             f"{'' if ratio is None else f'{ratio:.2f}x'} | {extra} |")
        if s.get("e2e"):
            e = s["e2e"]
            lines += ["", "## e2e: teskd-train", "", f"- command: `{e.get('command')}`",
                      f"- {e.get('steps')} steps, images/s per epoch {e.get('images_per_s')}, "
                      f"exit status {e.get('exit_status')}",
                      f"- final accuracies {e.get('final')}, best teacher top-1 {e.get('teacher_top1')} "
                      f"(chance {e.get('chance')})"]
            if e.get("stopped"):
                lines.append(f"- {e['stopped']} (the unfinished epoch ran at {e.get('images_per_s_unfinished_epoch')} "
                             "img/s by its progress bar)")
    not_run = [s for s in results["stages"] if s["status"] != "ok"]
    skipped = {s["name"]: s["tests"]["skip_reasons"] for s in results["stages"]
               if s.get("tests", {}).get("skip_reasons")}
    lines += ["", "## What did not run, and why", ""]
    for s in not_run:
        lines.append(f"- stage {s['name']}: {s['status']}" + (f" ({s['why']})" if s.get("why") else ""))
    for name, reasons in skipped.items():
        for reason, n in list(reasons.items())[:15]:
            lines.append(f"- {name}: {n} skipped: {reason}")
    if not not_run and not skipped:
        lines.append("- everything ran")
    lines += ["", f"Written {results['written']}; the logs of every stage are in logs.tar.gz."]
    return "\n".join(lines) + "\n"


def pack_logs(work, out):
    work = Path(work)
    tmp = Path(out) / ".logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            rel = path.relative_to(work)
            if rel.as_posix().startswith(_ARCHIVE_SKIP_DIRS) or not path.is_file() or path.is_symlink():
                continue
            if not path.name.endswith(_ARCHIVE_SKIP) and path.stat().st_size < 4 * 2**20:
                tar.add(path, arcname=str(rel))
    os.replace(tmp, Path(out) / "logs.tar.gz")


def report(work, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = collect(work)
    _atomic_write(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    _atomic_write(out / "summary.md", summary_markdown(results))
    pack_logs(work, out)
    return results


# -------------------------------------------------------------------------------------------------------- check
def check(out, dry_run=False):
    """The problems of a finished suite's OUT folder (empty: it is whole). With ``dry_run``, every stage ran."""
    out = Path(out)
    problems = []
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if len(files) > MAX_OUT_FILES:
        problems.append(f"{len(files)} files in {out} (at most {MAX_OUT_FILES} come back): {files}")
    for name in OUT_FILES:
        if name not in files:
            problems.append(f"{out / name} is missing")
    extra = [f for f in files if f not in OUT_FILES]
    if extra:
        problems.append(f"unexpected files in {out}: {extra}")
    if "logs.tar.gz" in files:
        size = (out / "logs.tar.gz").stat().st_size
        if size > MAX_ARCHIVE_BYTES:
            problems.append(f"logs.tar.gz is {size / 2**20:.1f} MiB (over {MAX_ARCHIVE_BYTES / 2**20:.0f} MiB)")
        try:
            with tarfile.open(out / "logs.tar.gz") as tar:
                names = tar.getnames()
            if not any(n.endswith(".log") for n in names):
                problems.append("logs.tar.gz holds no stage log")
        except (tarfile.TarError, OSError) as e:
            problems.append(f"logs.tar.gz does not open: {e}")
    results = _read_json(out / "results.json")
    if results is None:
        problems.append("results.json is missing or not JSON")
        return problems
    for s in results["stages"]:
        if dry_run and s["status"] != "ok":
            problems.append(f"stage {s['name']}: {s['status']}")
        if s["name"] == "tests" and s["status"] == "ok" and "tests" not in s:
            problems.append("stage tests: no JUnit counts")
        if dry_run and s["name"] in ("loss", "step", "data") and not s.get("benchmarks"):
            problems.append(f"stage {s['name']}: no benchmark figures")
        if dry_run and s["name"] == "e2e" and not (s.get("e2e") or {}).get("images_per_s_last_epoch"):
            problems.append("stage e2e: no images/s figure")
    background = set(results.get("background", []))
    if dry_run and sum(s.get("cap_s", 0) for s in results["stages"] if s["name"] not in background) > 360:
        problems.append("the stage caps sum to more than 6 minutes")
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    if "What did not run" not in summary:
        problems.append("summary.md has no 'What did not run' section")
    return problems


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "env":
        info = environment(os.environ.get("GPU_SUITE_COMMAND", "bench/gpu_suite.sh"))
        _atomic_write(Path(argv[1]) / "env.json", json.dumps(info, indent=1) + "\n")
        print("\n".join(f"{k}: {v}" for k, v in info.items()))
        return 0
    if len(argv) == 3 and argv[0] == "report":
        report(argv[1], argv[2])
        return 0
    if len(argv) >= 2 and argv[0] == "check":
        problems = check(argv[1], dry_run="--dry-run" in argv[2:])
        for p in problems:
            print(f"gpu_suite check: {p}", file=sys.stderr)
        if not problems:
            print(f"gpu_suite check: {argv[1]} is whole")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
