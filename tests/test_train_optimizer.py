"""teskd-train's SGD (PyTorch's fused SGD, momentum buffers made at zero) against the plain torch.optim.SGD.

The plain optimiser is the reference: the same parameters, the same gradients and learning rates, with Nesterov
momentum and per-group weight decay, with and without a grad scaler that skips overflowing steps.
"""

import pytest
import torch
from tolerances import assert_close

from teskd_fast.train.build import build_optimizer, sgd
from teskd_fast.train.config import resolve

HAS_CUDA = torch.cuda.is_available()
SHAPES = [(16, 3, 3, 3), (16,), (10, 41), (1,)]
HYPER = dict(lr=0.1, momentum=0.9, nesterov=True)


def _params(dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype).to(device)) for s in SHAPES]


def _groups(params):
    # Weight decay on the first three, none on the last (as for BatchNorm with --no-bn-weight-decay).
    return [{"params": params[:3], "weight_decay": 5e-4}, {"params": params[3:], "weight_decay": 0.0}]


def _grads(steps, dtype, device="cpu", overflow=(), seed=1):
    """Per step, one gradient per parameter; the steps in ``overflow`` carry an inf and a NaN."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads = [torch.randn(s, generator=g, dtype=dtype).to(device) for s in SHAPES]
        if step in overflow:
            grads[0].view(-1)[3] = float("inf")
            grads[2].view(-1)[0] = float("nan")
        out.append(grads)
    return out


def _run(make, params, grads, scaler=None):
    optimizer = make(_groups(params))
    for step, step_grads in enumerate(grads):
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * 0.8**step
        for p, grad in zip(params, step_grads, strict=True):
            p.grad = grad.clone() if scaler is None else scaler.scale(grad.clone())
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def _fused(groups):
    return sgd(groups, **HYPER)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_sgd_makes_the_plain_step(dtype, foreach):
    grads = _grads(6, dtype)
    plain = _params(dtype)
    _run(lambda groups: torch.optim.SGD(groups, foreach=foreach, **HYPER), plain, grads)
    ours = _params(dtype)
    optimizer = _run(_fused, ours, grads)
    assert all(g["fused"] for g in optimizer.param_groups)
    for i, (a, b) in enumerate(zip(ours, plain, strict=True)):
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=f"parameter {i}")
        else:
            # The fused kernel rounds its scalars differently: a few units in the last place after 6 steps.
            assert_close(a, b.double(), torch.float32, name=f"parameter {i}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scaler_skipped_steps_leave_the_fused_optimizer_as_the_plain_one(dtype):
    """Overflowing steps (the first, and one later) are skipped: afterwards the parameters match the plain SGD."""
    grads = _grads(6, dtype, overflow=(0, 3))
    plain, ours = _params(dtype), _params(dtype)
    plain_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _run(lambda groups: torch.optim.SGD(groups, **HYPER), plain, grads, plain_scaler)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = _run(_fused, ours, grads, scaler)
    # The fused optimiser reads found_inf itself: GradScaler.step never reads it on the host.
    assert optimizer._step_supports_amp_scaling
    assert scaler.get_scale() == plain_scaler.get_scale() == 2.0**8
    for i, (a, b) in enumerate(zip(ours, plain, strict=True)):
        assert torch.isfinite(a).all(), f"parameter {i}"
        assert_close(a, b.double(), dtype, name=f"parameter {i}")
        assert torch.isfinite(optimizer.state[a]["momentum_buffer"]).all(), f"momentum buffer {i}"


def test_first_step_skipped_keeps_zero_momentum():
    params = _params(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    optimizer = _run(_fused, params, _grads(1, torch.float32, overflow=(0,)), scaler)
    for p, before in zip(params, _params(torch.float32), strict=True):
        assert torch.equal(p, before)
        assert torch.equal(optimizer.state[p]["momentum_buffer"], torch.zeros_like(p))


def test_a_plain_state_dict_loads_into_the_fused_optimizer():
    """A checkpoint of the plain SGD (``fused: False``, no momentum yet) keeps the optimiser fused and exact."""
    dtype = torch.float64
    grads = _grads(5, dtype, overflow=(2,))
    plain = _params(dtype)
    before = torch.optim.SGD(_groups(plain), **HYPER).state_dict()
    _run(lambda groups: torch.optim.SGD(groups, **HYPER), plain, grads, torch.amp.GradScaler("cpu"))
    ours = _params(dtype)
    optimizer = _fused(_groups(ours))
    optimizer.load_state_dict(before)
    assert all(g["fused"] and g["foreach"] is None for g in optimizer.param_groups)
    assert optimizer._step_supports_amp_scaling
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in ours)
    scaler = torch.amp.GradScaler("cpu")
    for step, step_grads in enumerate(grads):
        for group in optimizer.param_groups:
            group["lr"] = 0.1 * 0.8**step
        for p, grad in zip(ours, step_grads, strict=True):
            p.grad = scaler.scale(grad.clone())
        scaler.step(optimizer)
        scaler.update()
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_build_optimizer_is_fused_over_the_param_groups():
    cfg = resolve({"preset": "digits-demo", "bn_weight_decay": False})
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, cfg)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.weight_decay, 0.0]
    assert all(g["fused"] and g["nesterov"] == cfg.nesterov for g in optimizer.param_groups)
    assert len(optimizer.state) == sum(1 for _ in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="fp16 autocast with a grad scaler on CUDA: needs a CUDA device")
def test_cuda_fp16_scaler_fused_matches_plain_without_host_sync():
    """fp16 autocast, a grad scaler, an overflowing first step: fused and plain SGD end with the same weights,
    and the fused one's ``scaler.step`` / ``scaler.update`` never synchronise with the host."""
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).to(device)
    twin = [p.detach().clone().requires_grad_() for p in net.parameters()]
    start = twin[0].detach().clone()
    ours = sgd(net.parameters(), weight_decay=5e-4, **HYPER)
    plain = torch.optim.SGD(twin, weight_decay=5e-4, **HYPER)
    scaler, plain_scaler = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    for step in range(8):
        x = torch.randn(32, 3, 12, 12, device=device, generator=g)
        y = torch.randint(0, 10, (32,), device=device, generator=g)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        if step == 0:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        # The same (scaled) gradients for the plain optimiser: only the optimisers differ.
        for p, q in zip(net.parameters(), twin, strict=True):
            q.grad = p.grad.clone()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(ours)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        plain_scaler.step(plain)
        plain_scaler.update()
        ours.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    # The first step was skipped (and maybe others, alike for both); later ones were taken.
    assert scaler.get_scale() == plain_scaler.get_scale() <= 2.0**15
    assert not torch.equal(twin[0], start)
    for i, (p, q) in enumerate(zip(net.parameters(), twin, strict=True)):
        assert_close(p, q.double(), torch.float32, name=f"parameter {i}")
    # The check can fail: the plain optimiser's scaler.step reads found_inf on the host.
    for q in twin:
        q.grad = torch.zeros_like(q)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            plain_scaler.step(plain)
    finally:
        torch.cuda.set_sync_debug_mode("default")
