"""The trainer on CUDA, compiled (the GPU suite runs these; they skip without CUDA): partial batches through
EagerTails with CutMix inside the compiled step, timm models compiled, and the two other compile modes. A tiny
network on the digits each, a few steps; the compiles land in the suite's shared Inductor cache."""

import copy
import math

import pytest
import torch

from teskd_fast.train import distributed as D
from teskd_fast.train import trainer
from teskd_fast.train.cli import main
from teskd_fast.train.config import resolve
from teskd_fast.train.metrics import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Digits in batches of 700: steps of 700, 700 and a tail of 37 (1437 images); evaluation in batches of 1400.
TINY = {"width": 0.0625, "batch_size": 700, "epochs": 1, "progress": False, "tensorboard": False, "plot": False,
        "device": "cuda", "precision": "bf16"}
CLI = ["--width", "0.0625", "--steps-per-epoch", "3", "--epochs", "1", "--no-progress", "--no-tensorboard",
       "--no-plot", "--device", "cuda"]


def _finite_rows(run):
    rows = read_metrics(run)
    assert rows and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss_teacher"]) for r in rows), rows
    return rows


def test_partial_batches_and_cutmix_through_the_compiled_step_on_cuda(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    env = D.setup("cuda")
    cfg = resolve({**TINY, "compile": True, "cutmix_alpha": 1.0, "cutmix_prob": 1.0})
    run = trainer.Trainer(cfg, tmp_path / "c", env)
    metrics = run.train_epoch()
    assert math.isfinite(metrics["train_loss"]) and run.position == 3
    compiled = run.evaluate()  # the 360 test images: one partial batch, run eagerly by EagerTails
    # One graph for train() at 700 images, one for eval() (the tail of 37 and the 360 compiled nothing).
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    eager = trainer.Trainer(resolve({**TINY, "compile": False}), tmp_path / "e", env)
    eager.raw_model.load_state_dict(copy.deepcopy(run.raw_model.state_dict()))
    want = eager.evaluate()
    assert compiled["_val_images"] == want["_val_images"] == 360
    for key, value in want.items():
        # bf16 autocast in both; the compiled kernels round differently: a few of the 360 images may flip.
        bound = 0.02 * abs(value) if key.startswith("val_loss") else 2.0  # percentage points: about 7 images
        assert abs(compiled[key] - value) <= bound, (key, compiled[key], value)


@pytest.mark.parametrize("arch", ["timm/test_efficientnet", "timm/test_convnext"])
def test_timm_model_compiled_on_cuda(arch, tmp_path):
    pytest.importorskip("timm", reason="timm is optional")
    run = tmp_path / "run"
    assert main(["--arch", arch, "--batch-size", "16", "--compile", "--precision", "bf16", *CLI,
                 "--out", str(run)]) == 0
    _finite_rows(run)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_modes_on_cuda(mode, tmp_path):
    run = tmp_path / "run"
    assert main(["--compile", "--compile-mode", mode, "--batch-size", "64", *CLI, "--out", str(run)]) == 0
    _finite_rows(run)
