"""Shared test set-up: Triton kernels run under the interpreter when no GPU is present."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before teskd_fast.kernels loads.
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(params=["cpu"] + (["cuda"] if HAS_CUDA else []))
def device(request):
    return torch.device(request.param)


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
