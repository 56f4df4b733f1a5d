"""The fast up block's BatchNorm statistics on CUDA do not run in TF32 (teskd_fast.models.fast): under
``torch.set_float32_matmul_precision("high")`` (teskd-train's setting) a float32 matmul rounds its inputs to 10
mantissa bits, so the Gram matrices are applied as tridiagonal stencils there (plain float32 arithmetic)."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close

from teskd_fast.models.fast import _tridiagonal_apply, _upsampled_statistics, resize_statistics


@pytest.mark.parametrize("n_in,n_out", [(1, 4), (2, 3), (4, 7), (7, 14), (9, 5)])
def test_the_interpolation_gram_is_tridiagonal_and_the_stencil_applies_it(n_in, n_out):
    _, gram = resize_statistics(n_in, n_out, torch.float64, torch.device("cpu"))
    assert torch.equal(gram, gram.triu(-1).tril(1)) and torch.equal(gram, gram.t())
    x = torch.randn(2, n_in, 3, 5, dtype=torch.float64)
    assert_close(_tridiagonal_apply(x, gram, 1), torch.einsum("ij,bjkc->bikc", gram, x), torch.float64)


def _reference(y, size):
    """Mean and biased variance of the upsampled map itself, in float64."""
    up = F.interpolate(y.double(), size=size, mode="bilinear", align_corners=True)
    return up.mean((0, 2, 3)), up.var((0, 2, 3), unbiased=False)


def test_stencil_and_matmul_statistics_agree_in_float64():
    y = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 2 + 1
    want = _reference(y, (9, 11))
    for stencil in (False, True):
        mean, var, n = _upsampled_statistics(y, (9, 11), stencil=stencil)
        assert n == 3 * 9 * 11
        assert_close(mean, want[0], torch.float64, name=f"mean (stencil {stencil})")
        assert_close(var, want[1], torch.float64, name=f"var (stencil {stencil})")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 matmuls need a CUDA device")
def test_up_block_statistics_on_cuda_are_float32_under_high_matmul_precision(record_property):
    """Measures the variance's error against float64, the stencil's (used) and the TF32 matmul's (not used)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        # The largest up block of an ImageNet ResNet-18 at 224 px: 28x28 -> 56x56, 64 channels, channels-last.
        y = (torch.randn(64, 64, 28, 28, device="cuda") * 3 + 1).to(memory_format=torch.channels_last)
        _, want = _reference(y.cpu(), (56, 56))
        errors = {}
        for stencil in (True, False):
            _, var, _ = _upsampled_statistics(y, (56, 56), stencil=stencil)
            errors["stencil" if stencil else "tf32 matmul"] = ((var.double().cpu() - want).abs() / want).max().item()
    finally:
        torch.set_float32_matmul_precision(previous)
    for name, error in errors.items():
        record_property(f"max relative variance error, {name}", error)
    print(f"max relative error of the up block's batch variance: {errors}")
    # float32 accumulation over 200,704 values per channel: about 1e-6; TF32 inputs: about 1e-4 per product.
    assert errors["stencil"] < 1e-5, errors
