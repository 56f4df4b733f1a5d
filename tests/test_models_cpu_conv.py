"""The way around oneDNN's strided 1x1 backward-weights bug (teskd_fast/models/cpu_conv.py).

The bug corrupts the heap, hangs or gives wrong weight gradients, so the runs that could meet it go in a
subprocess with a timeout, once with oneDNN's AVX2 dispatch (what AVX2-only CPUs get) and once with the machine's
own (AVX-512 where it has it, which fails at 56 px and more).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from tolerances import assert_close

import teskd_fast
from teskd_fast.models.cpu_conv import SMALL_CHANNELS, UnitStridePointwiseConv2d

DISPATCHES = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "native": {}}


def run_isolated(code, dispatch, timeout=90):
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    env.update(DISPATCHES[dispatch])
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s with the {dispatch} oneDNN dispatch")
    assert proc.returncode == 0, f"exit {proc.returncode} with the {dispatch} dispatch:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("stride", [2, 3, (2, 1)])
@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_unit_stride_pointwise_conv_equals_strided_conv_float64(memory_format, stride, size):
    conv = nn.Conv2d(5, 6, 1, stride=stride, bias=True).double()
    safe = nn.Conv2d(5, 6, 1, stride=stride, bias=True).double()
    safe.load_state_dict(conv.state_dict())
    safe.__class__ = UnitStridePointwiseConv2d
    x = torch.randn(3, 5, *size, dtype=torch.float64).to(memory_format=memory_format)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(conv(x))
    y1, y2 = conv(x1), safe(x2)
    assert_close(y2, y1, torch.float64, "output")
    y1.backward(g)
    y2.backward(g)
    assert_close(x2.grad, x1.grad, torch.float64, "input gradient")
    assert_close(safe.weight.grad, conv.weight.grad, torch.float64, "weight gradient")
    assert_close(safe.bias.grad, conv.bias.grad, torch.float64, "bias gradient")


@pytest.mark.parametrize("formulation", ["fast", "faithful"])
def test_only_small_strided_pointwise_convs_are_routed(formulation):
    small = teskd_fast.create_model("resnet18", 10, stem="cifar", width=0.0625, formulation=formulation)
    routed = [n for n, m in small.named_modules() if isinstance(m, UnitStridePointwiseConv2d)]
    # layer2..4 downsample shortcuts: 4, 8 and 16 input channels at width 1/16; the third has 16 (not affected).
    assert routed == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    full = teskd_fast.create_model("resnet18", 10, stem="cifar", formulation=formulation)
    assert not any(isinstance(m, UnitStridePointwiseConv2d) for m in full.modules())
    assert small.state_dict().keys() == full.state_dict().keys()
    strided_pointwise = [m for m in full.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                         and m.stride != (1, 1)]  # fmt: skip
    assert strided_pointwise and all(m.in_channels >= SMALL_CHANNELS for m in strided_pointwise)


@pytest.mark.parametrize("dispatch", sorted(DISPATCHES))
def test_strided_pointwise_weight_gradients_are_right_on_every_dispatch(dispatch):
    # Every input channel count below the block, at the sizes where the raw op fails: the module's weight
    # gradient (float32, oneDNN) against float64 (PyTorch's own kernel).
    out = run_isolated("""
        import torch, torch.nn as nn
        from teskd_fast.models.cpu_conv import UnitStridePointwiseConv2d, SMALL_CHANNELS
        torch.manual_seed(0)
        worst = 0.0
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for cin in range(1, SMALL_CHANNELS):
                for size in (8, 32, 56):
                    conv = nn.Conv2d(cin, 8, 1, stride=2, bias=False).to(memory_format=torch.channels_last)
                    conv.__class__ = UnitStridePointwiseConv2d
                    x = torch.randn(6, cin, size, size).to(memory_format=torch.channels_last).requires_grad_()
                    g = torch.randn(6, 8, size // 2, size // 2)
                    conv(x).backward(g)
                    ref = conv.double()
                    w = ref.weight.detach().clone().requires_grad_()
                    torch.nn.functional.conv2d(x.detach().double(), w, stride=2).backward(g.double())
                    err = ((conv.weight.grad.double() - w.grad).abs().max() / w.grad.abs().max()).item()
                    worst = max(worst, err)
        print(worst)
    """, dispatch)
    assert float(out) < 1e-5, f"weight gradient off by {float(out):.3g} (relative) with the {dispatch} dispatch"


# The hang (AVX2, 32 px) in the fast tier; the machine's own dispatch and the 224 px crash in the slow tier.
@pytest.mark.parametrize("dispatch", ["avx2", pytest.param("native", marks=pytest.mark.slow)])
@pytest.mark.parametrize("stem,size", [("cifar", 32), pytest.param("imagenet", 224, marks=pytest.mark.slow)])
def test_tiny_fast_network_trains_on_every_dispatch(dispatch, stem, size):
    # The reproduction: six SGD steps of the TESKD loss on a width-1/16 channels-last network. Before the
    # way around it hung (AVX2, 32 px) or crashed (AVX2 and AVX-512, 224 px).
    out = run_isolated(f"""
        import torch, teskd_fast
        torch.manual_seed(0)
        torch.set_num_threads(2)
        m = teskd_fast.create_model("resnet18", num_classes=3, stem="{stem}", width=0.0625)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        for _ in range(6):
            x, y = torch.randn(6, 3, {size}, {size}), torch.randint(0, 3, (6,))
            out = m(x)
            teskd_fast.teskd_loss(out.logits, out.student_logits, y, out.feature, out.student_features).backward()
            opt.step()
            opt.zero_grad()
        print(float(sum(p.detach().abs().sum() for p in m.parameters())))
    """, dispatch)
    assert torch.isfinite(torch.tensor(float(out)))
