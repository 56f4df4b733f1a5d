"""Process-group set-up for ``torchrun`` (single- or multi-node): NCCL on CUDA, gloo on the CPU.

``TESKD_FAST_DIST_TIMEOUT`` (seconds) bounds the process group's operations, joining it included (default:
PyTorch's, 10 minutes for NCCL and 30 for gloo); a process that cannot join raises :class:`DistributedSetupError`.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from teskd_fast.device import make_current, resolve_device


class DistributedSetupError(RuntimeError):
    """This process could not join its ``torchrun`` process group (no rendezvous, a peer gone, a timeout)."""


@dataclass
class DistEnv:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_rank() -> int:
    """This process's rank as ``torchrun`` set it in the environment (0 for a plain run), known before setup()."""
    return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def setup(device_name: str) -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables (a plain ``teskd-train``), returns a single-process environment.

    Args:
        device_name: the ``--device`` value.

    Returns:
        a :class:`DistEnv`; each CUDA process uses ``cuda:LOCAL_RANK``. A CUDA device (``--device cuda:1`` in a
        single process too) becomes the process's current CUDA device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    try:
        # A bare "cuda" (or "auto" on a GPU machine) is this process's GPU: cuda:LOCAL_RANK.
        device = resolve_device(device_name, index=local_rank)
    except RuntimeError as e:
        raise RuntimeError(f"--device {device_name}: {e}") from None
    # Before NCCL starts, and in a single process too: what uses the current device must find this one.
    make_current(device)
    if world_size <= 1:
        return DistEnv(device=device)
    rank = launch_rank()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            timeout = _timeout()
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                                    **_restart_store(rank, world_size, timeout))
        except Exception as e:  # DistNetworkError, DistStoreError, a gloo or NCCL error
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            text = str(e).strip().splitlines()
            raise DistributedSetupError(
                f"rank {rank} of {world_size} could not join the {backend} process group at {where}: "
                f"{text[0] if text else type(e).__name__} (are the other processes running and reachable?)"
            ) from None
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _restart_store(rank: int, world_size: int, timeout: datetime.timedelta | None) -> dict[str, Any]:
    """Under torchrun: the worker group's rendezvous store under a prefix of this attempt's own, which every rank
    of the group, on every node, agrees on.

    torchrun keeps its store across restarts, and the addresses the failed attempt's ranks published there are
    still in it: a restarted rank that reads one before its new peer overwrites it connects to a dead process
    (gloo: "connectFullMesh failed ... Connection refused", or a hang). Seen here in about half the restarts of
    a two-rank gloo job with torch 2.14; with a prefix per attempt, in none.

    The prefix cannot come from ``TORCHELASTIC_RESTART_COUNT``: each node's agent keeps its own count, and a
    restart caused by another node (re)joining does not increment it, so the nodes of one group can hold
    different counts (and would form their group under different prefixes: a hang). Nor does torchrun tell its
    workers the rendezvous round. So the group agrees on one itself, in the shared store (:func:`_agree_attempt`).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ and "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return {}
    store, _, _ = next(dist.rendezvous("env://", rank, world_size,
                                       **({} if timeout is None else {"timeout": timeout})))
    attempt = _agree_attempt(store, rank, world_size, timeout or datetime.timedelta(minutes=30))
    return {"store": dist.PrefixStore(f"teskd_fast/attempt/{attempt}", store)}


def _agree_attempt(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta,
                   poll_s: float = 0.02) -> str:
    """A name for this worker group's attempt that every rank agrees on, in a store earlier attempts wrote to.

    Rank 0 (a new process in every attempt) names the attempt with a fresh random token and publishes it as the
    leader; each other rank answers the leader it reads with its own fresh token; once every rank has answered,
    rank 0 publishes the tokens it collected under its name. A rank that read a stale leader (an earlier
    attempt's, whose list holds no token of this process) reads the leader again until it finds the list with
    its own token. Bounded by ``timeout``: :class:`DistributedSetupError` names the ranks that did not answer.
    """
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        store.set("teskd_fast/leader", token)
        answers = [f"teskd_fast/answer/{token}/{r}" for r in range(1, world_size)]
        while not store.check(answers):
            if time.monotonic() > deadline:
                missing = [r for r, key in enumerate(answers, 1) if not store.check([key])]
                raise DistributedSetupError(f"ranks {missing} did not answer rank 0 within {timeout} "
                                            "(the elastic restart's handshake)")
            time.sleep(poll_s)
        store.set(f"teskd_fast/members/{token}", ",".join(store.get(key).decode() for key in answers))
        return token
    answered = None
    while True:
        if store.check(["teskd_fast/leader"]):
            leader = store.get("teskd_fast/leader").decode()
            if leader != answered:
                store.set(f"teskd_fast/answer/{leader}/{rank}", token)
                answered = leader
            members = f"teskd_fast/members/{leader}"
            if store.check([members]) and token in store.get(members).decode().split(","):
                return leader
        if time.monotonic() > deadline:
            raise DistributedSetupError(f"rank {rank} found no answer from rank 0 within {timeout} "
                                        "(the elastic restart's handshake)")
        time.sleep(poll_s)


def _timeout() -> datetime.timedelta | None:
    value = os.environ.get("TESKD_FAST_DIST_TIMEOUT")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DistributedSetupError(f"TESKD_FAST_DIST_TIMEOUT={value!r}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``--sync-bn``: every BatchNorm of ``model`` synchronised over the process group, the network unchanged.

    ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns timm's ``BatchNormAct2d`` (BatchNorm, then its activation
    and drop: EfficientNet, MobileNetV3, RegNet, ...) into a plain SyncBatchNorm whose activation is never called,
    silently training another network with the same state_dict keys. A model holding timm's norm-and-activation
    layers goes through timm's own conversion (its ``SyncBatchNormAct`` subclasses ``nn.SyncBatchNorm`` and keeps
    them); plain BatchNorm layers become ``nn.SyncBatchNorm`` either way.
    """
    layers = sys.modules.get("timm.layers")  # a model with timm's layers in it has imported them
    if layers is not None and any(isinstance(m, layers.BatchNormAct2d) for m in model.modules()):
        return layers.convert_sync_batchnorm(model)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


# Inside keep_process_group(), cleanup() leaves the process group alone.
_keep_depth = 0


@contextlib.contextmanager
def keep_process_group() -> Iterator[None]:
    """Keep the process group for several runs in one process (``teskd-compare``), destroying it at the end.

    Re-creating a group after destroying it hangs under torchrun (its rendezvous store keeps the first group's
    keys), so the first :func:`setup` inside creates it, the next ones reuse it, and :func:`cleanup` waits.
    """
    global _keep_depth
    _keep_depth += 1
    try:
        yield
    finally:
        _keep_depth -= 1
        cleanup()


def cleanup() -> None:
    """Destroy the process group, and with it every object that still holds it, before the interpreter exits.

    ``destroy_process_group`` only forgets the group: a DDP wrapper keeps it alive. A trainer can outlive its
    function in a reference cycle (an import done while building the network leaves one through torch.fx's
    frame inspection), so without a collection here the group is freed in the interpreter's final collection,
    where gloo's threads met a finalising interpreter and aborted a rank that had finished its work
    ("terminate called without an active exception", SIGABRT: rare, about once in a hundred two-rank CPU
    torchrun runs on a loaded 2-core machine, and once in CI).
    """
    if _keep_depth:
        return
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def all_reduce(tensor: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over the job (a no-op for one process). ``op``: ``"sum"``, ``"min"`` or ``"max"``."""
    if env.distributed:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True when ``flag`` is true on any process (all processes must call this together)."""
    if not env.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=env.device)
    return bool(all_reduce(t, env, "max").item() > 0)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()
