"""The README's and docs' Python examples run: every ```python block, at small sizes on the CPU.

Each block runs as written, in a namespace that defines the names its text takes as given (``x``, ``y``, the
loss's inputs, a ``teacher.pt`` in the working folder), with these documented changes only:

- SETUP: per block, the code run before it (small inputs, the files it loads);
- SUBSTITUTE: per block, ``(text, replacement)`` pairs applied to its text (a smaller model of the same family,
  the arguments an ``...`` stands for);
- SKIPPED: the blocks that need what a CPU test machine has not (CUDA, a dataset, DALI), with the reason.

A new block is in none of them and fails :func:`test_every_block_is_run_or_skipped_with_a_reason`. The inline
``teskd_fast.wrap(...)`` examples run too (:func:`test_inline_wrap_examples_run`).
"""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^ {0,3}```python\n(.*?)^ {0,3}```", re.M | re.S)


def blocks() -> dict[str, str]:
    """``"PAGE#N"`` (the page's N-th python block, from 0) -> its code."""
    out = {}
    for page in PAGES:
        for i, m in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            out[f"{page.relative_to(ROOT)}#{i}"] = m.group(1)
    return out


# The loss's inputs at B = 4, C = 10, W = 8, and a small TESKD network for ``model(x)``.
LOSS_INPUTS = """
import torch
import teskd_fast
torch.manual_seed(0)
teacher_logits, student_logits = torch.randn(4, 10), torch.randn(3, 4, 10)
teacher_feature, student_features = torch.randn(4, 8), torch.randn(3, 4, 8)
target = torch.randint(0, 10, (4,))
model = teskd_fast.create_model("resnet18", num_classes=10, stem="cifar", width=0.0625)
x = torch.randn(4, 3, 16, 16)
"""
IMAGES = """
import torch
import teskd_fast
torch.manual_seed(0)
x = images = torch.randn(2, 3, 32, 32)
y = labels = torch.randint(0, 100, (2,))
"""
# The published code's checkpoint: the faithful network's state_dict, saved by DataParallel ("module.").
OFFICIAL_CHECKPOINT = IMAGES + """
_reference = teskd_fast.create_model("resnet18", num_classes=100, stem="cifar", formulation="faithful")
torch.save({"module." + k: v for k, v in _reference.state_dict().items()}, "reference_checkpoint.pth")
"""
TEACHER_PT = """
import os
import timm
import torch
from safetensors.torch import save_file
os.makedirs("RUN")
_state = timm.create_model("convnext_atto", num_classes=10).state_dict()
torch.save(_state, "RUN/teacher.pt")
save_file({k: v.contiguous() for k, v in _state.items()}, "RUN/teacher.safetensors")
"""

SETUP = {
    "README.md#0": LOSS_INPUTS,
    "README.md#1": IMAGES,
    "docs/loss.md#0": LOSS_INPUTS,
    "docs/networks.md#0": OFFICIAL_CHECKPOINT,
    "docs/backbones.md#0": IMAGES,
    "docs/backbones.md#1": TEACHER_PT,
    "docs/networks.md#1": IMAGES + "import timm\ntimm_model = timm.create_model('resnet18', num_classes=100)\n",
}
SUBSTITUTE = {
    # The same family, a tenth of the cost.
    "docs/backbones.md#0": [('"convnext_tiny"', '"convnext_atto"')],
    # "..." stands for the five inputs of the line above.
    "docs/loss.md#0": [("teskd_loss(..., return_parts=True)", "teskd_loss(teacher_logits, student_logits, target, "
                        "teacher_feature, student_features, return_parts=True)")],
}
SKIPPED = {
    "README.md#2": "needs the CIFAR-100 files, an ImageNet folder, DALI and CUDA (the loaders' own tests run them)",
    "docs/data.md#0": "needs the CIFAR-100 files and CUDA (tests/test_data_cifar.py runs the loader)",
    "docs/data.md#1": "needs an ImageNet folder, DALI and CUDA (tests/test_data_imagenet.py runs the loaders)",
    "docs/data.md#2": "needs an ImageNet folder, DALI and CUDA (tests/test_data_imagenet.py runs the loaders)",
    "docs/your-own-data.md#0": "trains for two epochs: tests/test_train_fit.py::test_the_docs_example_runs_as_written "
    "runs it as written (slow tier)",
}


def test_every_block_is_run_or_skipped_with_a_reason():
    found = blocks()
    assert found, "no python block found: the extraction is broken"
    unknown = [key for key in found if key not in SETUP and key not in SKIPPED]
    assert not unknown, f"give each new block a SETUP entry (or a SKIPPED reason) in {__file__}: {unknown}"
    gone = [key for key in {**SETUP, **SUBSTITUTE, **SKIPPED} if key not in found]
    assert not gone, f"entries for blocks that are no longer there (renumbered?): {gone}"
    for key, pairs in SUBSTITUTE.items():
        for text, _ in pairs:
            assert text in found[key], (key, text)


@pytest.mark.parametrize("key", sorted(SETUP))
def test_the_block_runs(key, tmp_path, monkeypatch):
    pytest.importorskip("timm")
    code = blocks()[key]
    for text, replacement in SUBSTITUTE.get(key, []):
        code = code.replace(text, replacement)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(SETUP[key], f"<setup of {key}>", "exec"), namespace)
    exec(compile(code, key, "exec"), namespace)
    # What each block computes is a finite loss or a model that gives logits.
    loss = namespace.get("loss")
    if isinstance(loss, tuple):
        loss = loss[0]
    if loss is not None:
        assert torch.isfinite(loss).all(), key
    assert "loss" in namespace or "model" in namespace, key


def test_inline_wrap_examples_run():
    """Every backticked ``teskd_fast.wrap(...)`` of the README and docs, evaluated with timm and small names."""
    timm = pytest.importorskip("timm")
    import teskd_fast

    spans = sorted({m.group(1) for page in PAGES for m in re.finditer(r"`(teskd_fast\.wrap\([^`]*\))`",
                                                                         page.read_text(encoding="utf-8"))})
    assert spans, "no inline wrap() example found"
    names = {"teskd_fast": teskd_fast, "timm": timm, "NAME": "resnet18", "N": 10, "num_classes": 10,
             "backbone": timm.create_model("resnet18", num_classes=10)}
    for span in spans:
        model = eval(span, dict(names))
        with torch.no_grad():
            out = model.eval()(torch.randn(2, 3, 32, 32))
        assert out.logits.shape == (2, 10), span
