"""The GPU suite's plumbing on the CPU (bench/gpu_suite.sh, docs/gpu-suite.md): the gpu marker rule, the install
stage's source-tree fallback, the report and its checker, and that the step benchmark takes teskd-train's step."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import teskd_fast

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
HAS_CUDA = torch.cuda.is_available()
sys.path.insert(0, str(BENCH))

import suite_report  # noqa: E402  (bench/ is not a package)

no_cuda_rule = pytest.mark.skipif(HAS_CUDA, reason="the marker rule is checked where CUDA is absent")


def _pytest(args, cwd, **env):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
@no_cuda_rule
def test_every_test_that_skips_without_cuda_is_marked_gpu():
    done = _pytest(["tests", "--collect-only", "-q"], REPO, TESKD_CHECK_GPU_MARKERS="1")
    assert done.returncode == 0 and "gpu marker rule:" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


UNMARKED = '''
import pytest

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_static_unmarked():
    pass

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_static_marked():
    pass

def test_runtime_unmarked():
    pytest.skip("no GPU on this machine")

def test_other_skip():
    pytest.skip("no C compiler on this machine")
'''


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
@no_cuda_rule
def test_the_marker_rule_fails_an_unmarked_cuda_skip(tmp_path):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_rule.py").write_text(UNMARKED)
    done = _pytest(["-q", "-rA", "-W", "ignore::pytest.PytestUnknownMarkWarning", "test_rule.py"], tmp_path)
    assert done.returncode == 1, done.stdout
    # A skipif marker skips at set-up: reported as an error there, a skip inside the test as a failure.
    assert "1 failed, 2 skipped, 1 error" in done.stdout, done.stdout
    failed = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert sorted(line.split()[1] for line in failed) == ["test_rule.py::test_runtime_unmarked",
                                                          "test_rule.py::test_static_unmarked"], failed
    static = _pytest(["-q", "--collect-only", "test_rule.py"], tmp_path, TESKD_CHECK_GPU_MARKERS="1")
    assert static.returncode == 1 and "test_static_unmarked: 'needs a CUDA device'" in static.stdout, static.stdout
    assert "test_static_marked" not in static.stdout.split("gpu marker rule")[-1]


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
def test_the_dry_run_skips_every_collected_test(tmp_path):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_rule.py").write_text("def test_fails():\n    raise AssertionError\n")
    done = _pytest(["-q", "-rs", "test_rule.py"], tmp_path, TESKD_GPU_SUITE_DRY_RUN="1")
    assert done.returncode == 0 and "1 skipped" in done.stdout and "--dry-run: collected" in done.stdout, done.stdout


@pytest.mark.slow
def test_install_falls_back_to_the_source_tree_when_pip_fails(tmp_path):
    # A constraints file that does not exist: pip refuses to install anything.
    env = {**os.environ, "PIP_CONSTRAINT": str(tmp_path / "missing.txt")}
    done = subprocess.run(["bash", "bench/suite_install.sh", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "running from the source tree" in done.stdout and "install: source tree" in done.stdout, done.stdout
    # This environment has teskd_fast installed editable: its finder is removed first, so that only the fallback's
    # mapping is left (the torch 2.11 dry run in .ci/run, where pip cannot install, checks it with nothing removed).
    probe = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
             "getattr(f, '__module__', '')]; import teskd_fast, teskd_fast.kernels.teskd_loss as k, teskd_fast.loss; "
             "print(teskd_fast.__file__); print(k.__file__)")
    script = f'source {tmp_path}/install.env && python -c "{probe}" && teskd-train --help | head -1'
    # From the repository (its teskd_fast/ folder first on sys.path, as for `python -m pytest`) and from elsewhere.
    for cwd in (REPO, tmp_path):
        ran = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
        assert ran.returncode == 0, ran.stderr
        package, kernel, usage = ran.stdout.splitlines()[:3]
        assert Path(package).resolve() == REPO / "teskd_fast" / "__init__.py"
        assert Path(kernel).resolve() == REPO / "kernels" / "teskd_loss.py"
        assert usage.startswith("usage: teskd-train")


def _work(tmp_path, rc_loss=0):
    work = tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    json.dump({"mode": "dry-run", "stages": ["tests", "loss", "e2e"], "caps": {"tests": 90, "loss": 45, "e2e": 90}},
              open(work / "plan.json", "w"))
    stages = [{"name": "tests", "rc": 1, "seconds": 3.5, "cap_s": 90},
              {"name": "loss", "rc": rc_loss, "seconds": 40.0, "cap_s": 45}]
    (work / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    (work / "logs" / "tests.log").write_text("1 failed, 1 passed, 1 skipped\n")
    (work / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_loss" name="test_a"/>'
        '<testcase classname="tests.test_loss" name="test_b"><failure message="AssertionError: grad off\n..."/>'
        '</testcase><testcase classname="tests.test_models" name="test_c"><skipped message="needs two CUDA devices"/>'
        "</testcase></testsuite></testsuites>")
    bench = {"benchmarks": [
        {"group": "loss-full", "name": "test_loss[reference]", "stats": {"median": 2e-3},
         "extra_info": {"provider": "reference", "baseline": True, "speedup_vs_baseline": 1.0}},
        {"group": "loss-full", "name": "test_loss[triton]", "stats": {"median": 2.5e-4},
         "extra_info": {"provider": "triton", "baseline": False, "speedup_vs_baseline": 8.0}}]}
    (work / "loss.bench.json").write_text(json.dumps(bench))
    return work


def test_report_has_counts_failures_figures_and_what_did_not_run(tmp_path):
    work, out = _work(tmp_path, rc_loss=124), tmp_path / "out"
    suite_report.report(work, out)
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.json", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "| tests | failed (exit 1) | 3.5 | 90 | 1 passed, 1 failed, 0 errors, 1 skipped |" in summary, summary
    assert "`tests.test_loss::test_b` (failed): AssertionError: grad off" in summary
    assert "| loss-full | triton | 250.0 us | 2.00 ms | 8.00x |" in summary, summary
    assert "stage loss: cut off at its cap" in summary and "stage e2e: not run (the suite stopped before it)" in summary
    assert "tests: 1 skipped: needs two CUDA devices" in summary
    results = json.loads((out / "results.json").read_text())
    assert [s["status"] for s in results["stages"]] == ["failed (exit 1)", "cut off at its cap", "not run"]
    problems = suite_report.check(out, dry_run=True)
    assert any("stage loss: cut off" in p for p in problems) and any("stage e2e: not run" in p for p in problems)
    (out / "stray.txt").write_text("")
    assert any("unexpected files" in p for p in suite_report.check(out))
    # A suite stopped from outside (the lease's limit) while a stage ran names that stage.
    (work / "running").write_text("e2e\n")
    stopped = suite_report.report(work, out)
    assert stopped["stages"][2]["status"] == "running or stopped in it"
    assert "| e2e | running or stopped in it |" in (out / "summary.md").read_text()


def test_step_benchmark_takes_teskd_trains_step():
    import bench_models
    import profile_gpu

    model = teskd_fast.create_model("resnet18", 10, stem="cifar", width=0.125)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    step = bench_models.make_step(model, x, y)
    # The loss's auto backend (Triton on CUDA) and the fused SGD, as teskd-train's build_criterion and sgd.
    assert step.loss.keywords == {"backend": "auto"} and step.loss.func is teskd_fast.teskd_loss
    assert all(group["fused"] for group in step.optimizer.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    plain = bench_models.make_step(model, x, y, plain_sgd=True)
    assert not any(group["fused"] for group in plain.optimizer.param_groups)
    # The GPU profile builds its step with the same builder.
    assert profile_gpu.make_step is bench_models.make_step


MODULE_TIMEOUT = '''
import time

import pytest

pytestmark = pytest.mark.timeout(300)

@pytest.mark.gpu
def test_hangs():
    time.sleep(6)

def test_quick():
    pass
'''


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
def test_the_suites_timeout_wins_over_a_modules_timeout_marker(tmp_path):
    # The module's 300 s marker would override --timeout; the suite's TESKD_GPU_TEST_TIMEOUT overrides it for
    # gpu-marked tests, so a hung CUDA test fails with its stack after the suite's limit.
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_hang.py").write_text(MODULE_TIMEOUT)
    done = _pytest(["-q", "--timeout=1", "-W", "ignore::pytest.PytestUnknownMarkWarning", "test_hang.py"], tmp_path,
                   TESKD_GPU_TEST_TIMEOUT="1")
    assert done.returncode == 1 and "1 failed, 1 passed" in done.stdout, done.stdout[-2000:]
    assert "Timeout (>1.0s)" in done.stdout and "test_hang.py::test_hangs" in done.stdout, done.stdout[-2000:]


# A stand-in for teskd-train stuck in a compile: it ignores SIGINT, as does the compile worker it starts (inductor's
# workers ignore it); it has printed the progress bar of step 20 of epoch 2 and finished epoch 1.
STUCK = r'''
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(f"worker {worker.pid}", flush=True)
sys.stderr.write("\repoch 2/3:  20%|##        | 20/100 [00:03<00:12,  6.5it/s, img_s=1664, loss=1.2]")
sys.stderr.flush()
time.sleep(120)
'''


@pytest.mark.slow  # several seconds of subprocesses or compiles (docs/testing.md, tiers)
def test_e2e_stage_kills_a_stuck_run_and_reports_what_it_has(tmp_path, capfd):
    import suite_e2e

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "images_per_s": 4321.5}) + "\n")
    args = [sys.executable, "-c", STUCK]
    rc, why, progress, killed = suite_e2e.supervise(args, budget_s=2.0, grace_s=1.0)
    assert killed and rc == -9 and why == "its time budget (2 s)"
    worker = int(capfd.readouterr().out.split("worker ")[1].split()[0])
    with pytest.raises(ProcessLookupError):  # the compile worker went with the group
        for _ in range(50):
            os.kill(worker, 0)
            __import__("time").sleep(0.1)
    out = suite_e2e.result(run_dir, ["python", "-m", "teskd_fast.train", "--epochs", "3"], rc, 3.0, why, progress,
                           killed, steps_per_epoch=100)
    assert out["steps"] == 120 and out["images_per_s"] == [4322] and out["images_per_s_last_epoch"] == 4322
    assert out["stopped"].startswith("stopped at step 120 by its time budget (2 s), in a compile")
    assert out["images_per_s_unfinished_epoch"] == 1664 and out["command"] == "teskd-train --epochs 3"


def test_report_of_a_stopped_e2e_run_and_the_background_warmup(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    json.dump({"mode": "gpu", "stages": ["install", "warmup", "step", "e2e"], "background": ["warmup"],
               "caps": {"install": 45, "warmup": 240, "step": 55, "e2e": 200}}, open(work / "plan.json", "w"))
    lines = [{"name": "install", "rc": 0, "seconds": 5.0, "cap_s": 45, "start": 100.0},
             {"name": "step", "rc": 0, "seconds": 30.0, "cap_s": 55, "start": 200.0},
             {"name": "e2e", "rc": 124, "seconds": 70.0, "cap_s": 200, "start": 230.0}]
    (work / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in lines))
    (work / "warmup.jsonl").write_text(json.dumps({"graph": "step", "ok": True, "seconds": 41.5, "end": 150}) + "\n")
    (work / "e2e.json").write_text(json.dumps({"images_per_s_last_epoch": None, "teacher_top1": None,
                                               "stopped": "stopped at step 0 by its time budget (60 s), in a compile"}))
    results = suite_report.report(work, out)
    summary = (out / "summary.md").read_text()
    # Still running: reported as such, and its graphs so far; the step stage began before it ended.
    assert "| warmup | running in the background |" in summary, summary
    assert results["stages"][1]["graphs"][0]["graph"] == "step"
    assert "no epoch finished, teacher top-1 None; stopped at step 0 by its time budget (60 s), in a compile" in summary
    assert "ran while the warm-up compiled" in summary.split("| step |")[1].splitlines()[0]
    # The background cap does not count in the suite's total.
    assert not [p for p in suite_report.check(out, dry_run=True) if "6 minutes" in p]
    (work / "stages.jsonl").write_text((work / "stages.jsonl").read_text() + json.dumps(
        {"name": "warmup", "rc": 0, "seconds": 120.0, "cap_s": 240, "start": 105.0}) + "\n")
    summary = suite_report.summary_markdown(suite_report.collect(work))
    assert "| warmup | ok | 120.0 | 240 | step done in 41.5 s |" in summary, summary
    assert "ran while the warm-up compiled" not in summary.split("| e2e |")[1].splitlines()[0]
