"""TESKD on timm backbones: a TESKD training step over the plain step of the same timm model, three families.

Groups ``backbones-step-<model>-<device>``: the plain timm model (cross-entropy, the baseline) versus the same model
wrapped by :func:`teskd_fast.wrap` (fast formulation, TESKD loss), forward + loss + backward + teskd-train's fused
SGD. The TESKD row's ``speedup_vs_baseline`` is plain / TESKD; it also carries ``step_over_plain`` (TESKD / plain),
``student_share`` (the fraction of the TESKD step that is not the plain step: the students, their loss and
their optimiser work) and ``student_macs_over_backbone`` (forward multiply-accumulates of the students over those
of the plain model, torch.utils.flop_counter). CPU: 64 px, batch 8, float32. CUDA: 224 px, batch 64, bf16
autocast, channels-last (skipped without CUDA). Set ``TESKD_BENCH_ROUNDS`` for the number of timed steps.
"""

import pytest
import torch
from bench_models import MEDIANS, forward_macs, make_step, run_step

import teskd_fast

timm = pytest.importorskip("timm", reason="timm is optional: pip install timm")

FAMILIES = ("convnext_atto", "regnetx_002", "resnet18d")
HAS_CUDA = torch.cuda.is_available()
SETTINGS = {"cpu": dict(size=64, batch=8, autocast=None)}
if HAS_CUDA:
    SETTINGS["cuda"] = dict(size=224, batch=64, autocast=torch.bfloat16)


@pytest.mark.parametrize("device", sorted(SETTINGS))
@pytest.mark.parametrize("provider", ["plain", "teskd-fast"])
@pytest.mark.parametrize("name", FAMILIES)
def test_backbone_step(benchmark, name, provider, device):
    s = SETTINGS[device]
    group = f"backbones-step-{name}-{device}"
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=100)
    model = plain if provider == "plain" else teskd_fast.wrap(plain, 100, formulation="fast")
    model = model.to(device, memory_format=torch.channels_last).train()
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (s["batch"],), device=device)
    info = {"image_size": s["size"], "macs_per_image": forward_macs(model, x[:1]),
            "params": sum(p.numel() for p in model.parameters())}
    if provider != "plain":
        info["student_macs_over_backbone"] = round(info["macs_per_image"] / forward_macs(plain, x[:1]) - 1, 3)
    run_step(benchmark, group, provider, make_step(model, x, y, autocast=s["autocast"]), device, s["batch"],
             baseline=provider == "plain", **info)
    base = MEDIANS.get((group, "plain"))
    if provider != "plain" and base is not None:
        ratio = MEDIANS[group, provider] / base
        benchmark.extra_info["step_over_plain"] = round(ratio, 2)
        benchmark.extra_info["student_share"] = round(1 - 1 / ratio, 3)
