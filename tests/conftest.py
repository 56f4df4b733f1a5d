"""Shared test set-up: Triton kernels run under the interpreter when no GPU is present; the gpu marker rule.

The rule (docs/gpu-suite.md): a test that exercises CUDA carries ``@pytest.mark.gpu``, so that
``bench/gpu_suite.sh`` (``pytest tests/ -m gpu``) runs it. Without CUDA, a test that skips naming CUDA or a GPU
in its reason but has no gpu marker fails instead (:func:`pytest_runtest_makereport`); with
``TESKD_GPU_SUITE_DRY_RUN=1`` (the suite's dry run) every collected test is skipped. With
``TESKD_GPU_TEST_TIMEOUT=N`` (the suite sets it), every gpu-marked test gets pytest-timeout's limit of N seconds,
over any module's or test's own ``timeout`` marker.
"""

import os
import re

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before teskd_fast.kernels loads.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else []))
def device(request):
    return torch.device(request.param)


# A skip reason that says the test needs CUDA (or a GPU): such a test must carry the gpu marker.
CUDA_SKIP = re.compile(r"\b(cuda|gpus?)\b", re.IGNORECASE)
DRY_RUN_SKIP = "bench/gpu_suite.sh --dry-run: collected, not run"


def static_cuda_skips(item):
    """The reasons of the skipif markers of ``item`` that hold on this machine and name CUDA or a GPU."""
    reasons = []
    for mark in item.iter_markers("skipif"):
        conditions = mark.args or (mark.kwargs.get("condition", True),)
        reason = mark.kwargs.get("reason", "")
        for condition in conditions:
            if isinstance(condition, str):
                condition = eval(condition, dict(item.module.__dict__))  # pytest's own string-condition rule
            if condition and CUDA_SKIP.search(reason):
                reasons.append(reason)
    return reasons


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TESKD_CHECK_GPU_MARKERS") == "1" and not HAS_CUDA:
        # The marker rule checked at collection (tests/test_gpu_suite.py): no test is run.
        bad = [f"{item.nodeid}: {reasons[0]!r}" for item in items
               if item.get_closest_marker("gpu") is None and (reasons := static_cuda_skips(item))]
        pytest.exit("gpu marker rule: these skip without CUDA but have no @pytest.mark.gpu:\n" + "\n".join(bad)
                    if bad else f"gpu marker rule: {len(items)} tests checked", returncode=1 if bad else 0)
    gpu_timeout = os.environ.get("TESKD_GPU_TEST_TIMEOUT")
    if gpu_timeout:
        # Put first among the item's own markers, the closest one, which pytest-timeout reads: it wins over a
        # module's ``pytestmark = pytest.mark.timeout(300)``, which would otherwise override --timeout.
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(pytest.mark.timeout(float(gpu_timeout)), append=False)
    if os.environ.get("TESKD_GPU_SUITE_DRY_RUN") == "1":
        for item in items:
            item.add_marker(pytest.mark.skip(reason=DRY_RUN_SKIP))


def unmarked_cuda_skip(item, report):
    """The message of a report that breaks the gpu marker rule (a CUDA skip of an unmarked test), else None."""
    if HAS_CUDA or not report.skipped or hasattr(report, "wasxfail") or item.get_closest_marker("gpu") is not None:
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if reason == DRY_RUN_SKIP or not CUDA_SKIP.search(reason):
        return None
    return (f"{item.nodeid} skips without CUDA ({reason!r}) but has no @pytest.mark.gpu: bench/gpu_suite.sh "
            "(pytest -m gpu) would never run it; mark it gpu (docs/gpu-suite.md)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    message = unmarked_cuda_skip(item, report)
    if message is not None:
        report.outcome, report.longrepr = "failed", message


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def lock_folder(tmp_path):
    """``lock_folder(path)`` makes a folder read-only (0o500) until the test ends.

    Skips the test where permissions do not stop this process's writes (root, with CAP_DAC_OVERRIDE).
    """
    probe = tmp_path / ".probe"
    probe.mkdir()
    probe.chmod(0o500)
    try:
        (probe / "file").touch()
        writes = True
    except PermissionError:
        writes = False
    finally:
        probe.chmod(0o700)
    if writes:
        pytest.skip("permissions do not stop this process's writes (root)")
    locked = []

    def lock(path):
        path.chmod(0o500)
        locked.append(path)

    yield lock
    for path in locked:
        path.chmod(0o700)
