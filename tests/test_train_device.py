"""Where teskd-train runs: the current CUDA device, the backend settings it shares with the benchmarks, and the
non-blocking metric reads on the tensors' own device."""

import math

import pytest
import torch

from teskd_fast.device import CUDA_MATMUL_PRECISION, configure_backends, make_current
from teskd_fast.train import distributed as D
from teskd_fast.train.config import resolve
from teskd_fast.train.metrics import LaggedReader
from teskd_fast.train.trainer import Trainer

HAS_CUDA = torch.cuda.is_available()
TWO_GPUS = HAS_CUDA and torch.cuda.device_count() >= 2
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA devices")
# The digits demo, a few steps, nothing written but the run folder's own files.
DIGITS = {"preset": "digits-demo", "steps_per_epoch": 3, "epochs": 1, "progress": False, "tensorboard": False,
          "plot": False, "compile": False}


def _backend_flags():
    return torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()


@pytest.fixture
def restore_backends():
    """Put back the process-wide flags (and the current CUDA device) a test changes."""
    flags = _backend_flags()
    current = torch.cuda.current_device() if HAS_CUDA else None
    yield
    torch.backends.cudnn.benchmark = flags[0]
    torch.set_float32_matmul_precision(flags[1])
    if current is not None:
        torch.cuda.set_device(current)


@pytest.fixture
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _trainer(tmp_path, device, **overrides):
    cfg = resolve({**DIGITS, "device": str(device), **overrides})
    return Trainer(cfg, tmp_path / "run", D.DistEnv(device=device))


def test_cuda_backends_are_the_documented_ones(restore_backends):
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    # A bare "cuda" sets the flags without touching the current device (the flags need no GPU).
    settings = configure_backends(torch.device("cuda"))
    assert settings == {"cudnn_benchmark": True, "float32_matmul_precision": "high"}
    assert _backend_flags() == (True, CUDA_MATMUL_PRECISION)
    # The settings stay readable through the getter torch.compile's autotuning calls.
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_the_cpu_leaves_the_backends_alone(restore_backends, tmp_path):
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    assert configure_backends(torch.device("cpu")) == {}
    trainer = _trainer(tmp_path, torch.device("cpu"))
    assert trainer.backends == {}
    assert _backend_flags() == (False, "highest")


def test_single_process_setup_on_the_cpu(single_process):
    env = D.setup("cpu")
    assert env.device == torch.device("cpu") and not env.distributed
    # A CPU device (and a CUDA one without an index) leaves the current CUDA device alone: nothing to set.
    make_current(torch.device("cpu"))
    make_current(torch.device("cuda"))
    if not HAS_CUDA:
        assert not torch.cuda.is_initialized()


def test_lagged_reader_on_the_cpu_reads_at_once():
    reader = LaggedReader(torch.device("cpu"))
    assert reader.latest() is None
    reader.push(torch.tensor([1.5, 2.0], dtype=torch.float64))
    assert reader.latest() == [1.5, 2.0]
    reader.push(torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert reader.latest() == [3.0, 4.0]


def _read_on(device):
    """A LaggedReader's value of a tensor on ``device``, pushed while ``cuda:0`` is the current device."""
    reader = LaggedReader(device)
    values = torch.arange(4, dtype=torch.float64, device=device) + 0.5
    with torch.cuda.device(0):
        reader.push(values)
    event = reader._pending[-1][1]
    torch.cuda.synchronize(device)
    return event, reader.latest()


@pytest.mark.gpu
@needs_cuda
def test_cuda_explicit_device_is_made_current(single_process, restore_backends):
    env = D.setup("cuda:0")
    assert env.device == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    event, latest = _read_on(env.device)
    assert event.device == env.device
    assert latest == [0.5, 1.5, 2.5, 3.5]


@pytest.mark.gpu
@needs_cuda
def test_cuda_trainer_configures_the_backends_and_steps_without_host_sync(tmp_path, restore_backends):
    """fp16 with its grad scaler: after warm-up steps, a training step never waits for the device."""
    device = torch.device("cuda", 0)
    trainer = _trainer(tmp_path, device, precision="fp16")
    assert trainer.backends == {"cudnn_benchmark": True, "float32_matmul_precision": CUDA_MATMUL_PRECISION}
    assert _backend_flags() == (True, CUDA_MATMUL_PRECISION) and torch.cuda.current_device() == 0
    assert trainer.optimizer._step_supports_amp_scaling
    batches = iter(trainer.train_loader)
    steps = torch.arange(4, device=device)
    for i in range(3):
        images, target = next(batches)
        trainer.train_step(images, target, steps[i])
    images, target = next(batches)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(images, target, steps[3])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(trainer.acc.sums).all()


@pytest.mark.gpu
@needs_two_gpus
def test_cuda_second_device_in_a_single_process(single_process, restore_backends, tmp_path):
    torch.cuda.set_device(0)
    env = D.setup("cuda:1")
    assert env.device == torch.device("cuda", 1) and torch.cuda.current_device() == 1
    # The reader's event belongs to the tensor's device even when another device is current.
    event, latest = _read_on(env.device)
    assert event.device == env.device
    assert latest == [0.5, 1.5, 2.5, 3.5]
    torch.cuda.set_device(0)
    trainer = _trainer(tmp_path, env.device)
    assert torch.cuda.current_device() == 1
    metrics = trainer.train_epoch()
    assert math.isfinite(metrics["train_loss"])
    assert all(p.device == env.device for p in trainer.model.parameters())
