"""The one tolerance helper of the test suite.

Element-wise checks use a per-dtype atol/rtol table; large reductions compare by relative RMS error.
"""

import torch

# dtype of the computation under test -> (atol, rtol) for element-wise comparison against a float64 oracle.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 5e-3),
}
# dtype -> bound on ||actual - expected|| / ||expected|| for whole tensors.
RMS_TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close(actual, expected, dtype, name="", scale=1.0):
    """Compare ``actual`` to the float64 ``expected`` with the tolerances of ``dtype``.

    ``scale`` widens both bounds (for quantities that pass through several roundings).
    """
    assert actual is not None, f"{name}: missing (None)"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(a, e, atol=atol * scale, rtol=rtol * scale, msg=lambda m: f"{name}: {m}")


def assert_rms_close(actual, expected, dtype, name="", scale=1.0):
    """Relative RMS error of ``actual`` against ``expected`` below the bound for ``dtype``."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = (a - e).norm() / e.norm().clamp_min(1e-30)
    bound = RMS_TOLERANCES[dtype] * scale
    assert err <= bound, f"{name}: relative RMS error {err:.3e} > {bound:.1e}"
