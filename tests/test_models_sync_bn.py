"""--sync-bn in the fast formulation: its up blocks, which compute their BatchNorm statistics themselves, use the
global batch's statistics, as nn.SyncBatchNorm does. Two gloo processes on the CPU against one on the whole
batch, in float64: output, input gradient, parameter gradients and running statistics."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tolerances import assert_close

from teskd_fast.models.fast import resize_bn_relu

SIZE = (7, 9)
# Unequal shards (4 and 2 images): the global statistics weigh each process by its batch.
SHARDS = [slice(0, 4), slice(4, 6)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(momentum):
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(6, 5, 4, 3, generator=gen, dtype=torch.float64) * 2 + 0.5
    g = torch.randn(6, 5, *SIZE, generator=gen, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(5, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(5, generator=gen, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(5, generator=gen, dtype=torch.float64) + 0.5)
    return y, g, bn


def _step(bn, y, g, steps=2):
    """Two train-mode steps of the up block's resize + BatchNorm + ReLU; the output and gradients of the last."""
    for _ in range(steps):
        bn.zero_grad()
        y = y.detach().requires_grad_()
        out = resize_bn_relu(y, bn, SIZE)
        (out * g).sum().backward()
    return {"out": out.detach(), "grad_y": y.grad, "grad_weight": bn.weight.grad, "grad_bias": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "num_batches_tracked": bn.num_batches_tracked.clone()}


def _faithful(bn, y, g, steps=2):
    """The faithful up block on the whole batch: resize, then a plain BatchNorm2d, then ReLU."""
    for _ in range(steps):
        bn.zero_grad()
        y = y.detach().requires_grad_()
        out = F.relu(bn(F.interpolate(y, size=SIZE, mode="bilinear", align_corners=True)))
        (out * g).sum().backward()
    return {"out": out.detach(), "grad_y": y.grad, "grad_weight": bn.weight.grad, "grad_bias": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "num_batches_tracked": bn.num_batches_tracked.clone()}


MOMENTA = {"momentum": 0.1, "cumulative": None}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, momentum in MOMENTA.items():
            y, g, bn = _inputs(momentum)
            sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(bn))[0]
            assert isinstance(sync, torch.nn.SyncBatchNorm)
            part = SHARDS[rank]
            torch.save(_step(sync, y[part], g[part]), os.path.join(out_dir, f"{name}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_bn")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", MOMENTA)
def test_two_processes_use_the_global_batch_statistics(two_processes, name):
    momentum = MOMENTA[name]
    ranks = [torch.load(two_processes / f"{name}-rank{r}.pt") for r in range(2)]
    y, g, bn = _inputs(momentum)
    want = _faithful(bn, y, g)
    f64 = torch.float64
    for r, part in enumerate(SHARDS):
        got = ranks[r]
        assert_close(got["out"], want["out"][part], f64, name=f"rank {r} output")
        # The input gradient holds every process's loss (they all depend on this shard through the statistics).
        assert_close(got["grad_y"], want["grad_y"][part], f64, name=f"rank {r} input gradient")
        for key in ("running_mean", "running_var"):
            assert_close(got[key], want[key], f64, name=f"rank {r} {key}")
        assert int(got["num_batches_tracked"]) == int(want["num_batches_tracked"]) == 2
    # Parameter gradients are per-process sums; DDP adds them up (then averages, as it does every gradient).
    for key in ("grad_weight", "grad_bias"):
        assert_close(ranks[0][key] + ranks[1][key], want[key], f64, name=key)
    # Per-process statistics would have given another output: the check above can fail.
    local = _faithful(_inputs(momentum)[2], y[SHARDS[1]], g[SHARDS[1]])
    assert (local["out"] - want["out"][SHARDS[1]]).abs().max() > 1e-3


def test_sync_batchnorm_without_a_process_group_uses_its_own_batch():
    y, g, bn = _inputs(0.1)
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(_inputs(0.1)[2]))[0]
    got, want = _step(sync, y, g), _faithful(bn, y, g)
    for key in ("out", "grad_y", "grad_weight", "grad_bias", "running_mean", "running_var"):
        assert_close(got[key], want[key], torch.float64, name=key)


def _network_worker(rank, port, out_dir):
    # Two processes on one GPU, joined by gloo (NCCL refuses two ranks on one device): SyncBatchNorm's
    # collectives go through the host, which is enough to compare the two formulations.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        import teskd_fast

        torch.manual_seed(0)
        images = torch.randn(8, 3, 32, 32, device="cuda", dtype=torch.float64)[rank * 4:(rank + 1) * 4]
        results = {}
        for formulation in ("faithful", "fast"):
            torch.manual_seed(1)
            model = teskd_fast.create_model("resnet18", num_classes=10, stem="cifar", formulation=formulation,
                                            width=0.125).double()
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).cuda().train()
            out = model(images)
            (out.logits.sum() + sum(s.sum() for s in out.student_logits)).backward()
            results[formulation] = {"logits": out.logits.detach().cpu(),
                                    "students": torch.stack(list(out.student_logits)).detach().cpu(),
                                    "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                    "grads": {k: p.grad.cpu() for k, p in model.named_parameters()}}
        torch.save(results, os.path.join(out_dir, f"net-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="nn.SyncBatchNorm needs CUDA tensors")
def test_fast_network_under_sync_batchnorm_equals_the_faithful_one_on_cuda(tmp_path):
    mp.start_processes(_network_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"net-rank{rank}.pt")
        fast, faithful = got["fast"], got["faithful"]
        for key in ("logits", "students"):
            assert_close(fast[key], faithful[key], torch.float64, name=f"rank {rank} {key}", scale=100.0)
        # Every running statistic, the up blocks' included, is the global batch's.
        for key, value in faithful["state"].items():
            if value.is_floating_point():
                assert_close(fast["state"][key], value, torch.float64, name=f"rank {rank} {key}", scale=100.0)
        for key, value in faithful["grads"].items():
            assert_close(fast["grads"][key], value, torch.float64, name=f"rank {rank} grad {key}", scale=100.0)


def test_sync_bn_conversion_keeps_timms_norm_and_activation_layers():
    """``--arch timm/NAME --sync-bn``: the converted network computes what the original does (timm's BatchNormAct2d
    keeps its activation; nn.SyncBatchNorm's own conversion drops it). Float64; train mode without a process group
    (SyncBatchNorm's train-mode sync needs CUDA tensors), eval mode in a 1-process gloo group, as in a run."""
    import copy

    import timm

    import teskd_fast
    from teskd_fast.train.distributed import convert_sync_batchnorm

    model = teskd_fast.wrap(timm.create_model("test_efficientnet", num_classes=5), 5).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    converted = convert_sync_batchnorm(copy.deepcopy(model))
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert not [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                and not isinstance(m, torch.nn.SyncBatchNorm)]
    assert converted.state_dict().keys() == model.state_dict().keys()
    for mode in ("train", "eval"):
        if mode == "eval":
            dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
        try:
            outputs = [getattr(m, mode)()(x.clone())[0] for m in (model, converted, plain)]
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        assert_close(outputs[1], outputs[0], dtype=torch.float64, name=mode)
        # The activation-dropping conversion computes another network (the test can fail).
        assert (outputs[2] - outputs[0]).abs().max() > 1e-3
