"""teskd-compare: the statistics against hand-computed values, the report, resume after SIGKILL, refusal, pairing."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from teskd_fast.train.compare import CompareError, main, parse, read_run, render_markdown, summarise
from teskd_fast.train.metrics import read_metrics
from teskd_fast.train.stats import betainc, mean, paired_difference, std, t_cdf, t_ppf

# A comparison small enough for a test: 2 seeds x 2 methods, 3 epochs of 3 steps, an eighth-width ResNet-18.
TINY = ["--epochs", "3", "--steps-per-epoch", "3", "--width", "0.125", "--no-progress", "--no-tensorboard",
        "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[1]
# Keys of compare.json that measure time, not what was computed (the cost: time against accuracy).
TIMING = {"time_s", "images_per_s", "device_hours", "cost", "cheapest"}


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted comparison, trained once for the tests that reuse it."""
    out = tmp_path_factory.mktemp("cmp") / "ref"
    assert main(TINY + ["--seeds", "2", "--out", str(out)]) == 0
    return out


# Statistics.


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042),
                                          (120, 1.980)])
def test_t_quantile_matches_the_printed_table(df, expected):
    assert round(t_ppf(0.975, df), 3) == expected
    assert t_ppf(0.025, df) == pytest.approx(-t_ppf(0.975, df), rel=1e-12)
    assert t_cdf(t_ppf(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_t_distribution_closed_forms():
    # df = 1 is the Cauchy distribution: quantile tan(pi (p - 1/2)); df = 2: t = (2p - 1) sqrt(2 / (4p(1 - p))).
    for p in (0.6, 0.9, 0.975, 0.995, 0.9999):
        assert t_ppf(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_ppf(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-10)
    assert round(t_ppf(0.995, 1), 3) == 63.657 and round(t_ppf(0.995, 5), 3) == 4.032
    # Many degrees of freedom: the normal quantile 1.959964.
    assert t_ppf(0.975, 10**7) == pytest.approx(1.959964, abs=1e-6)
    assert t_cdf(0.0, 3) == 0.5
    # I_x(a, 1) = x^a, I_x(1, b) = 1 - (1 - x)^b, I_1/2(a, a) = 1/2.
    assert betainc(2.5, 1.0, 0.3) == pytest.approx(0.3**2.5, rel=1e-12)
    assert betainc(1.0, 3.0, 0.2) == pytest.approx(1 - 0.8**3, rel=1e-12)
    assert betainc(7.0, 7.0, 0.5) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="p must be"):
        t_ppf(1.0, 3)


def test_t_quantile_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 17, 0.7, 250):
        for p in (0.55, 0.9, 0.975, 0.9995):
            assert t_ppf(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9)


def test_paired_difference_by_hand():
    # Differences 2, 3, 1: mean 2, std 1, sem 1/sqrt(3), t(0.975, 2) = 4.302653: [-0.484138, 4.484138].
    d = paired_difference([80.0, 82.0, 81.0], [78.0, 79.0, 80.0])
    assert (d.n, d.mean, d.std) == (3, 2.0, 1.0)
    assert d.sem == pytest.approx(1 / math.sqrt(3))
    assert d.t_critical == pytest.approx(4.302653, abs=1e-6)
    assert (d.low, d.high) == (pytest.approx(-0.484138, abs=1e-6), pytest.approx(4.484138, abs=1e-6))
    assert d.contains_zero
    # Differences 1.0, 1.2, 0.8, 1.1: mean 1.025, std sqrt(0.0875 / 3) = 0.170783, t(0.975, 3) = 3.182446.
    d = paired_difference([71.0, 71.2, 70.8, 71.1], [70.0, 70.0, 70.0, 70.0])
    assert d.mean == pytest.approx(1.025) and d.std == pytest.approx(0.170783, abs=1e-6)
    assert (d.low, d.high) == (pytest.approx(0.753248, abs=1e-5), pytest.approx(1.296752, abs=1e-5))
    assert d.contains_zero is False
    one = paired_difference([80.0], [79.0])
    assert one.mean == 1.0 and not one.defined and one.contains_zero is None and math.isnan(one.low)
    assert mean([1.0, 2.0, 6.0]) == 3.0 and std([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7.0))
    with pytest.raises(ValueError, match="3 values against 2"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


# The report, from run folders written by hand.


def _fake_run(folder: Path, teacher: list[float], students: bool, epoch_time: float = 1.5) -> None:
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for epoch, acc in enumerate(teacher, 1):
            row = {"epoch": epoch, "val_top1_teacher": acc, "epoch_time": epoch_time}
            if students:
                row.update(val_top1_student3=acc - 1, val_top1_student2=acc - 2, val_top1_student1=acc - 3,
                           val_top1_ensemble=acc + 0.5)
            f.write(json.dumps(row) + "\n")


def test_report_from_hand_written_run_folders(tmp_path):
    out = tmp_path / "cmp"
    cmp = parse(["--preset", "cifar100-resnet18", "--epochs", "4", "--seeds", "2", "--out", str(out)])
    # 4 epochs, report_after 0.75: the reference's rule takes the best teacher top-1 after epoch 3, i.e. epoch 4.
    curves = {("teskd", 27): [10.0, 60.0, 75.0, 74.0], ("baseline", 27): [10.0, 50.0, 72.0, 71.0],
              ("teskd", 28): [10.0, 62.0, 70.0, 77.0], ("baseline", 28): [10.0, 55.0, 71.0, 73.0]}
    for run in cmp.runs:
        _fake_run(run.folder, curves[run.method, run.seed], run.method == "teskd")
    results = [read_run(run) for run in cmp.runs]
    report = summarise(cmp, results)
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("teskd", 27), ("baseline", 27), ("teskd", 28),
                                                                 ("baseline", 28)]
    assert report["best_after_epoch"] == 3
    assert [r["teacher_top1_last"] for r in report["runs"]] == [74.0, 71.0, 77.0, 73.0]
    assert [r["teacher_top1_best_after"] for r in report["runs"]] == [74.0, 71.0, 77.0, 73.0]
    assert report["runs"][0]["ensemble_top1"] == 74.5 and report["runs"][1]["student1_top1"] is None
    assert report["runs"][0]["time_s"] == 6.0
    teskd = report["methods"]["teskd"]["teacher_top1_last"]
    assert teskd["mean"] == 75.5 and teskd["std"] == pytest.approx(math.sqrt(4.5))
    assert "student3_top1" not in report["methods"]["baseline"]
    # Differences 3 and 4: mean 3.5, std sqrt(0.5), t(0.975, 1) = 12.7062: 3.5 +- 6.3531.
    d = report["difference"]["teacher_top1_last"]
    assert d["mean"] == 3.5 and d["std"] == pytest.approx(math.sqrt(0.5))
    assert d["low"] == pytest.approx(3.5 - 12.706205 * 0.5, abs=1e-5) and d["contains_zero"] is True
    # The paper's figures for this preset, in rows of their own.
    assert report["paper"]["teskd"] == 79.15 and report["paper"]["baseline"] == 74.41
    assert report["paper"]["difference"] == 4.74
    md = render_markdown(report)
    assert "| TESKD (paper's figure) | 1 | – | 79.15 |" in md and "| baseline (paper's figure) | 1 | – | 74.41 |" in md
    assert "| 27 | TESKD | 74.00 | 74.00 | 73.00 | 72.00 | 71.00 | 74.50 | 6.0 |" in md
    assert "| TESKD (ours) | 2 | 75.50 ± 2.12 |" in md
    # Two seeds: the interval, and no verdict.
    assert "[-2.85, +9.85]" in md and "no verdict: 2 paired seeds (a verdict needs at least 3)" in md
    assert "| teacher (best after epoch 150 of 200) (paper's figure) | +4.74 |" in md
    assert report["paper"]["recipe_changes"] == ["epochs"] and "changes the published recipe (epochs)" in md
    assert summarise(parse(["--preset", "cifar100-resnet18", "--seed", "3"]), results)["paper"]["recipe_changes"] == []
    # A preset without published figures has no paper rows.
    demo = parse(TINY + ["--out", str(tmp_path / "demo")])
    assert len(demo.seeds) == 2 and summarise(demo, [read_run(r) for r in cmp.runs])["paper"] is None
    assert len(parse(["--preset", "cifar100-resnet18"]).seeds) == 3
    # An incomplete run folder is named, with status 1.
    (cmp.runs[1].folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_top1_teacher": 1.0}) + "\n")
    with pytest.raises(CompareError, match="baseline-seed27/metrics.jsonl holds epochs \\[1\\]") as e:
        read_run(cmp.runs[1])
    assert e.value.status == 1


def test_verdicts_need_three_seeds_and_a_spread_and_intervals_stay_in_range(tmp_path):
    out = tmp_path / "cmp"
    cmp = parse(["--preset", "cifar100-resnet18", "--epochs", "4", "--seeds", "3", "--out", str(out),
                 "--arms", "teskd,baseline,label-smoothing,cutmix"])
    ref = [74.0, 77.0, 78.0]
    last = {"teskd": ref, "baseline": [64.0, 66.0, 66.0],  # 10, 11, 12 points below: a clear difference
            "label-smoothing": [r - 0.28 for r in ref],  # 0.28 below on every seed: no spread
            "cutmix": [100.0, 100.0, 99.0]}  # near 100: its mean's interval reaches past it
    # The baseline 1e-7 s per epoch slower than the cutmix arm: an extra time within the noise; TESKD twice as long.
    times = {"teskd": 3.0, "baseline": 1.5000001, "label-smoothing": 1.6, "cutmix": 1.5}
    for run in cmp.runs:
        _fake_run(run.folder, [10.0, 50.0, 60.0, last[run.arm][run.seed - 27]], run.arm == "teskd", times[run.arm])
    report = summarise(cmp, [read_run(run) for run in cmp.runs])
    verdicts = {a: c["teacher_top1_last"]["verdict"] for a, c in report["comparisons"].items()}
    assert verdicts["baseline"] == "TESKD better than baseline at 95% with 3 seeds"
    assert verdicts["label-smoothing"].startswith("no verdict: the difference is +0.28 on every one of the 3 seeds")
    assert report["comparisons"]["label-smoothing"]["teacher_top1_last"]["p"] is None
    assert verdicts["cutmix"] == "TESKD worse than cutmix at 95% with 3 seeds"
    # The best epoch after 3 is chosen on the test set: shown, not tested.
    best = report["comparisons"]["baseline"]["teacher_top1_best_after"]
    assert best["mean"] == 11.0 and best["p"] is None and "the published code's measure" in best["verdict"]
    # The cutmix arm's mean 99.67 +- 4.303 * 0.577 / sqrt(3) = [98.23, 101.10]: inside [0, 100].
    cut = report["methods"]["cutmix"]["teacher_top1_last"]
    assert cut["high"] == 100.0 and cut["low"] == pytest.approx(99.6667 - 4.302653 * math.sqrt(1 / 3) / math.sqrt(3),
                                                                 abs=1e-3)
    # The cost: no points per hour beside an extra time within its noise; TESKD's rate over its 4 x 1.5 s.
    cost = report["cost"]
    assert report["cheapest"] == "cutmix" and cost["baseline"]["gain_per_hour"] is None
    ref_mean, cut_mean = 229 / 3, 299 / 3
    assert cost["teskd"]["gain_per_hour"] == pytest.approx((ref_mean - cut_mean) / (6 / 3600))
    # 0.4 s more than the cheapest's 6 s is above 5% of it.
    assert cost["label-smoothing"]["gain_per_hour"] == pytest.approx((ref_mean - 0.28 - cut_mean) / (0.4 / 3600))
    md = render_markdown(report)
    assert "| baseline | 0.0017 | 65.33 ± 1.15 | +0.0000 | -34.33 | – (the extra time is within its noise) |" in md
    # The recipe every arm shares, printed.
    assert ("lr 0.1 (global batch 128), schedule multistep (x0.1 at 0.5, 0.75 of the epochs), SGD momentum 0.9 "
            "Nesterov, weight decay 0.0005, label smoothing 0, 4 epochs, image size 32, test 32"
            in md)
    assert "teacher (best after epoch 3, chosen on the test set) (ours; the published code's measure)" in md


def _finish(run) -> None:
    """A summary.json as teskd-train writes it last (listing no file), for a hand-written run."""
    (run.folder / "summary.json").write_text(json.dumps({"epochs": run.cfg.epochs, "outputs": []}))


def test_report_only_names_and_leaves_out_unfinished_and_unreadable_runs(tmp_path, capsys):
    from teskd_fast.train.compare import write_record

    out = tmp_path / "cmp"
    cmp = parse(["--preset", "cifar100-resnet18", "--epochs", "4", "--seeds", "5", "--out", str(out), "--no-plot"])
    for run in cmp.runs:
        _fake_run(run.folder, [10.0, 50.0, 60.0, 70.0 + (run.method == "teskd") + run.seed % 3], False)
        _finish(run)
    write_record(cmp)
    assert main(["--report-only", str(out)]) == 0
    capsys.readouterr()
    folder = {r.name: r.folder for r in cmp.runs}
    cut = folder["baseline-seed27"] / "metrics.jsonl"
    cut.write_text(cut.read_text()[:-20])  # the last row cut short by a killed write
    garbage = folder["teskd-seed28"] / "metrics.jsonl"
    lines = garbage.read_text().splitlines()
    garbage.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    nan = folder["baseline-seed29"] / "metrics.jsonl"
    nan.write_text(nan.read_text().replace('"val_top1_teacher": 60.0', '"val_top1_teacher": NaN'))
    (folder["teskd-seed29"] / "summary.json").unlink()
    assert main(["--report-only", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name, words in (("baseline-seed27", f"{cut}: line 4 is not a JSON row"),
                        ("teskd-seed28", f"{garbage}: line 2 is not a JSON row"),
                        ("baseline-seed29", f"{nan}: epoch 3: val_top1_teacher is nan, not a finite number"),
                        ("teskd-seed29", f"{folder['teskd-seed29'] / 'summary.json'}: missing: the run is unfinished")):
        assert f"teskd-compare: {name} left out of the report: {words}" in err
    report = json.loads((out / "compare.json").read_text())
    assert [r["run"] for r in report["left_out"]] == ["baseline-seed27", "teskd-seed28", "teskd-seed29",
                                                     "baseline-seed29"]
    # Averaged over the usable runs; paired over the seeds where both are usable (30 and 31).
    assert report["methods"]["teskd"]["teacher_top1_last"]["n"] == 3
    assert report["difference"]["teacher_top1_last"]["seeds"] == [30, 31]
    assert "## Runs left out" in (out / "compare.md").read_text()
    # A line of JSON that is not a row (a number, a list) is named as such, not taken for one.
    other = folder["baseline-seed31"] / "metrics.jsonl"
    other.write_text("\n".join(["[1, 2]", *other.read_text().splitlines()[1:]]) + "\n")
    with pytest.raises(CompareError, match=f"{other}: line 1 is not a JSON row \\(a JSON list, not an object"):
        read_run(cmp.runs[-1])


def test_a_rerun_reusing_a_finished_run_with_a_garbage_metrics_line_says_so(finished, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(finished, out)
    metrics = out / "baseline-seed28" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + "{not json\n")
    assert main(TINY + ["--seeds", "2", "--out", str(out), "--no-plot"]) == 1
    captured = capsys.readouterr()
    assert "[4/4] baseline seed 28: finished, reused" in captured.out and "Traceback" not in captured.err
    assert f"baseline-seed28 left out of the report: {metrics}: line 4 is not a JSON row" in captured.err


def test_a_missing_dataset_exits_1_before_any_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["--preset", "cifar100-resnet18", "--out", str(out), "--data-dir", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "cifar100 not found" in err and str(tmp_path / "nothing") in err and "Traceback" not in err
    assert not (out / "teskd-seed27" / "last.pt").exists()


# End to end.


@pytest.mark.slow
def test_resume_after_sigkill_in_the_second_run(finished, tmp_path):
    out = tmp_path / "killed"
    # A real SIGKILL during the second run (baseline, seed 27): after its first epoch's row, at its next step
    # (the middle of epoch 2). The hooks sit on metrics.py's classes, which every training step goes through.
    script = textwrap.dedent(f"""
        import os, signal, sys
        from teskd_fast.train import metrics
        from teskd_fast.train.compare import main

        log, update, armed = metrics.MetricsLog.log, metrics.TrainAccumulator.update, []

        def logged(self, row):
            log(self, row)
            if self.run_dir.name == "baseline-seed27" and row["epoch"] == 1:
                armed.append(True)

        def stepped(self, *args):
            update(self, *args)
            if armed:
                os.kill(os.getpid(), signal.SIGKILL)

        metrics.MetricsLog.log, metrics.TrainAccumulator.update = logged, stepped
        sys.exit(main({TINY + ["--seeds", "2", "--out", str(out)]!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    first, second = out / "teskd-seed27", out / "baseline-seed27"
    assert (first / "summary.json").is_file() and not (second / "summary.json").is_file()
    assert (second / "last.pt").is_file() and not (out / "teskd-seed28").exists()
    before = _mtimes(first)

    proc = subprocess.run([sys.executable, "-m", "teskd_fast.train.compare", *TINY, "--seeds", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[1/4] TESKD seed 27: finished, reused" in proc.stdout
    assert "[2/4] baseline seed 27: resuming from its last.pt" in proc.stdout
    assert "[3/4] TESKD seed 28: training" in proc.stdout
    assert _mtimes(first) == before, "the finished first run was touched"
    # The report equals the uninterrupted comparison's, time aside.
    a = json.loads((finished / "compare.json").read_text())
    b = json.loads((out / "compare.json").read_text())
    assert _without_timing(a) == _without_timing(b)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A third invocation trains nothing.
    before = {name: _mtimes(out / name) for name in ("teskd-seed27", "baseline-seed27", "teskd-seed28")}
    assert main(TINY + ["--seeds", "2", "--out", str(out)]) == 0
    assert {name: _mtimes(out / name) for name in before} == before


def test_a_changed_flag_is_refused_and_more_seeds_reuse_the_finished_runs(finished, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(finished, out)
    runs = {p.name: _mtimes(p) for p in out.iterdir() if p.is_dir()}
    assert main(TINY + ["--seeds", "2", "--out", str(out), "--lr", "0.2", "--temperature", "3"]) == 2
    err = capsys.readouterr().err
    assert "lr 0.05 -> 0.2" in err and "temperature 4.0 -> 3.0" in err and "epochs" not in err
    # The YAML file and the flags count alike; a flag that does not change what a run computes is accepted.
    (tmp_path / "c.yaml").write_text("kd_weight: 0.5\n")
    assert main(TINY + ["--out", str(out), "--config", str(tmp_path / "c.yaml")]) == 2
    assert "kd_weight 0.8 -> 0.5" in capsys.readouterr().err
    assert {p.name: _mtimes(p) for p in out.iterdir() if p.is_dir()} == runs
    # One seed: the finished runs of seed 27 are reused, and the report says there is no interval.
    assert main(TINY + ["--seeds", "1", "--out", str(out), "--no-plot"]) == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["seeds"] == [27] and report["difference"]["teacher_top1_last"]["low"] is None
    assert "no verdict: 1 paired seed" in (out / "compare.md").read_text()
    assert {p.name: _mtimes(p) for p in out.iterdir() if p.is_dir()} == runs
    # Three seeds: only seed 29 is trained.
    assert main(TINY + ["--seeds", "3", "--out", str(out), "--no-plot"]) == 0
    assert "[5/6] TESKD seed 29: training" in capsys.readouterr().out
    assert {p.name: _mtimes(p) for p in out.iterdir() if p.is_dir() and p.name in runs} == runs
    assert json.loads((out / "compare.json").read_text())["difference"]["teacher_top1_last"]["n"] == 3


def test_bad_flags_exit_2_with_a_message(capsys):
    for argv, words in ((["--method", "baseline"], "--method is not accepted"), (["--seeds", "0"], "--seeds"),
                        (["--resume", "x"], "--resume is not accepted"), (["--lr", "-1"], "--lr"),
                        (["--seeds", "two"], "--seeds")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err


def test_baseline_starts_from_the_teskd_teacher_and_sees_the_same_data(tmp_path):
    # With lr 1e-30 and no momentum or weight decay, an update changes no weight (only exact zeros, by < 1e-28):
    # teacher.pt holds the initial teacher weights, and BatchNorm's running statistics record the two training
    # batches in their order (running = 0.09 m1 + 0.1 m2 from zero: swapping them changes it).
    out = tmp_path / "cmp"
    flags = ["--epochs", "1", "--steps-per-epoch", "2", "--lr", "1e-30", "--momentum", "0", "--weight-decay", "0",
             "--warmup-epochs", "0", "--width", "0.125", "--no-progress", "--no-tensorboard", "--no-plot",
             "--device", "cpu"]
    cmp = parse(flags + ["--seeds", "2", "--out", str(out)])
    for teskd, base in zip(cmp.runs[::2], cmp.runs[1::2], strict=True):
        a, b = teskd.cfg.to_dict(), base.cfg.to_dict()
        assert {k for k in a if a[k] != b[k]} == {"method", "out"} and a["seed"] == teskd.seed == base.seed
    assert main(flags + ["--seeds", "2", "--out", str(out)]) == 0
    teachers = {run.name: torch.load(run.folder / "teacher.pt", weights_only=True) for run in cmp.runs}
    for seed in cmp.seeds:
        t, b = teachers[f"teskd-seed{seed}"], teachers[f"baseline-seed{seed}"]
        assert t.keys() == b.keys()
        for k in t:
            if k.endswith("num_batches_tracked"):
                assert t[k] == b[k] == 2
            elif "running" in k:
                torch.testing.assert_close(t[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
            else:
                torch.testing.assert_close(t[k], b[k], rtol=0, atol=1e-27, msg=k)
        rows = {r.method: read_run(r) for r in cmp.runs if r.seed == seed}
        assert rows["teskd"]["teacher_top1_last"] == rows["baseline"]["teacher_top1_last"]
    # And the seeds differ: another seed, other weights.
    assert not torch.allclose(teachers["teskd-seed27"]["conv1.weight"], teachers["teskd-seed28"]["conv1.weight"])


@pytest.mark.slow
def test_torchrun_runs_each_run_on_all_ranks_one_after_another(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "teskd_fast.train.compare", "--epochs", "2", "--steps-per-epoch", "2", "--width", "0.125",
           "--no-progress", "--no-tensorboard", "--no-plot", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only rank 0 prints and writes the report; every run is one 2-process job.
    assert proc.stdout.count("teskd-compare: [") == 4
    assert proc.stdout.count("over 2 process(es)") == 4
    report = json.loads((out / "compare.json").read_text())
    assert [(r["method"], r["seed"]) for r in report["runs"]] == [("teskd", 27), ("baseline", 27), ("teskd", 28),
                                                                 ("baseline", 28)]
    assert all(r["epochs"] == 2 for r in report["runs"])


@pytest.mark.slow
def test_a_run_killed_during_its_final_export_is_finished_without_training(tmp_path):
    # A real SIGKILL in the first run's last step: its teacher exported, its curves not yet drawn. Before, its
    # summary.json (written first) made it "finished": curves.png stayed missing for good.
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from teskd_fast.train import report
        from teskd_fast.train.compare import main

        plot = report.plot_curves

        def killed(run_dir):
            if run_dir.name == "teskd-seed27":
                os.kill(os.getpid(), signal.SIGKILL)
            plot(run_dir)

        report.plot_curves = killed
        sys.exit(main({TINY + ["--seeds", "1", "--out", str(out)]!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = out / "teskd-seed27"
    assert (run / "teacher.pt").is_file() and not (run / "curves.png").exists()
    assert not (run / "summary.json").exists()
    last, rows = (run / "last.pt").stat().st_mtime_ns, read_metrics(run)

    proc = subprocess.run([sys.executable, "-m", "teskd_fast.train.compare", *TINY, "--seeds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[1/2] TESKD seed 27: resuming from its last.pt" in proc.stdout
    # Finished without a step: the same checkpoint and rows, and every promised file there.
    assert (run / "last.pt").stat().st_mtime_ns == last and read_metrics(run) == rows
    summary = json.loads((run / "summary.json").read_text())
    assert summary["outputs"] == ["teacher.pt", "teacher.safetensors", "teacher.json", "curves.png"]
    assert all((run / name).is_file() for name in summary["outputs"])
    assert "[1/2] TESKD seed 27: finished, reused" in subprocess.run(
        [sys.executable, "-m", "teskd_fast.train.compare", *TINY, "--seeds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env).stdout
