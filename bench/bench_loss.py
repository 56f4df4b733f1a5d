"""The TESKD loss: reference vs closed-form torch vs torch.compile(reference) vs fused Triton.

Forward (inputs that require grad, so the fused paths also compute the gradients), backward alone, and full
(forward + backward); K = 3 students with ResNet-18-sized features (D = 512), as a TESKD step has them; at the
issue's CPU shape (128 x 100) also the logit terms alone (group suffix ``-logits``) and the students stacked
(``[K, B, C]`` and ``[K, B, D]`` tensors, as ``FastTESKDNet`` returns them; suffix ``-stacked``; elsewhere they are
lists of K tensors, as the faithful network returns them). Baseline of every group: the reference backend.

As a script (``PYTHONPATH=. python bench/bench_loss.py [--repeats N] [--steps N] [--isa native avx2 generic]``),
the per-build table of :func:`isa_table`.

On an x86 CPU, the torch backend's fused kernel is also measured as built for each instruction set below this
CPU's (``torch-avx2``: ``-mno-avx512f``, what an AVX2-only CPU runs; ``torch-generic``: x86-64, SSE2) at 128 x
100, beside the same run's reference: see ``TESKD_FAST_CPU_KERNEL_ISA`` in ``teskd_fast.kernels.teskd_loss_cpu``.
"""

import contextlib
import functools
import os
import platform

import pytest
import torch
from common import record, sync

from teskd_fast import teskd_loss
from teskd_fast.kernels import teskd_loss_cpu as cpu_kernel

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
K, D = 3, 512
SHAPES = [(128, 100), (256, 1000), (1024, 1000)]
DTYPES = [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32]
PROVIDERS = ["reference", "torch", "compiled-reference", "triton"]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


# The torch backend with its kernel built for a narrower instruction set than this CPU's (x86 only; "torch" is
# the -march=native build): provider -> $TESKD_FAST_CPU_KERNEL_ISA.
ISA_PROVIDERS = {}
if platform.machine().lower() in ("x86_64", "amd64") and not HAS_CUDA:
    if {"avx512f", "avx2"} <= _cpu_flags():
        ISA_PROVIDERS["torch-avx2"] = "avx2"
    ISA_PROVIDERS["torch-generic"] = "generic"
PROVIDERS += list(ISA_PROVIDERS)


@contextlib.contextmanager
def _kernel_isa(provider):
    """The fused CPU kernel built for the provider's instruction set, for the duration of one benchmark."""
    isa = ISA_PROVIDERS.get(provider)
    if isa is None:
        yield
        return
    saved = os.environ.get(cpu_kernel.ENV_ISA)
    os.environ[cpu_kernel.ENV_ISA] = isa
    try:
        built = cpu_kernel.reload()
        assert built is not None, f"the {isa} build of the CPU kernel failed: {cpu_kernel.status()[1]}"
        yield
    finally:
        if saved is None:
            os.environ.pop(cpu_kernel.ENV_ISA, None)
        else:
            os.environ[cpu_kernel.ENV_ISA] = saved
        cpu_kernel.reload()


def _inputs(B, C, dtype, stacked=False):
    """Teacher and K student logits and features (the students as K tensors, or stacked ``[K, B, ...]`` as
    ``FastTESKDNet`` returns them), leaves that require grad; targets."""
    g = torch.Generator().manual_seed(0)
    teacher = (torch.randn(B, C, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    students = [(torch.randn(B, C, generator=g) * 3).to(DEVICE, dtype) for _ in range(K)]
    target = torch.randint(0, C, (B,), generator=g).to(DEVICE)
    f_t = torch.randn(B, D, generator=g).clamp_min(0).to(DEVICE, dtype)
    f_s = [torch.randn(B, D, generator=g).clamp_min(0).to(DEVICE, dtype) for _ in range(K)]
    if stacked:
        return teacher, torch.stack(students).requires_grad_(), target, f_t, torch.stack(f_s).requires_grad_()
    return teacher, [s.requires_grad_() for s in students], target, f_t, [f.requires_grad_() for f in f_s]


def _leaves(teacher, students, f_s):
    return [teacher, *([students] if isinstance(students, torch.Tensor) else students),
            *([f_s] if isinstance(f_s, torch.Tensor) else f_s)]  # fmt: skip


@functools.cache
def _compiled_reference():
    return torch.compile(functools.partial(teskd_loss, backend="reference"), dynamic=False)


def _loss_fn(provider):
    if provider == "compiled-reference":
        return _compiled_reference()
    return functools.partial(teskd_loss, backend="torch" if provider in ISA_PROVIDERS else provider)


def _skip_reason(provider, B, C):
    if provider == "triton" and not HAS_CUDA:
        return "triton timings need a CUDA device (the CPU interpreter is for correctness only)"
    if provider == "compiled-reference" and (B, C) != ((256, 1000) if HAS_CUDA else (128, 100)):
        return "torch.compile(reference) is measured at one shape per device, to keep `pytest bench/` short"
    if not HAS_CUDA and B * C > 256 * 1000 and provider != "reference" and provider != "torch":
        return "CPU: large shapes for reference and torch only"
    if provider in ISA_PROVIDERS and (B, C) != (128, 100):
        return "the kernel's narrower instruction-set builds are measured at 128 x 100"
    return None


def _params():
    for B, C in SHAPES:
        for dtype in DTYPES:
            for provider in PROVIDERS:
                smoke = (B, C) == (128, 100) and provider in ("reference", "torch", *ISA_PROVIDERS)
                marks = [pytest.mark.smoke] if smoke else []
                if HAS_CUDA:
                    # The GPU suite's selection; torch.compile(reference) there in bfloat16 alone (one cold compile).
                    extra = provider == "compiled-reference" and dtype != torch.bfloat16
                    marks = [pytest.mark.gpu, *([pytest.mark.gpu_extra] if extra else [])]
                yield pytest.param(provider, B, C, dtype, marks=marks, id=f"{provider}-{B}x{C}x{K}-{str(dtype)[6:]}")


# "features": the K students as lists (the faithful network's form); "stacked": as [K, B, ...] tensors
# (FastTESKDNet's form); "logits": no feature term.
@pytest.mark.parametrize("inputs", ["features", "stacked", "logits"])
@pytest.mark.parametrize("mode", ["full", "forward", "backward"])
@pytest.mark.parametrize("provider, B, C, dtype", list(_params()))
def test_loss(benchmark, provider, B, C, dtype, mode, inputs):
    reason = _skip_reason(provider, B, C)
    small_providers = ("reference", "torch", *ISA_PROVIDERS)
    if inputs != "features" and (mode != "full" or (B, C) != (128, 100) or provider not in small_providers):
        reason = reason or f"{inputs}: the full step at 128 x 100, reference and torch (each build)"
    if reason:
        pytest.skip(reason)
    if os.environ.get("TRITON_INTERPRET") == "1" and provider == "triton":
        pytest.skip("TRITON_INTERPRET=1 is set: interpreter timings mean nothing")
    with _kernel_isa(provider):
        _run(benchmark, provider, B, C, dtype, mode, inputs)


def _run(benchmark, provider, B, C, dtype, mode, inputs):
    features = inputs != "logits"
    teacher, students, target, f_t, f_s = _inputs(B, C, dtype, stacked=inputs == "stacked")
    fn = _loss_fn(provider)
    leaves = _leaves(teacher, students, f_s)

    def forward():
        if not features:
            return fn(teacher, students, target)
        return fn(teacher, students, target, f_t, f_s)

    def full():
        for t in leaves:
            t.grad = None
        forward().backward()
        sync(DEVICE)

    def fwd_only():
        forward()
        sync(DEVICE)

    for _ in range(3):
        full()
    suffix = {"features": "", "stacked": "-stacked", "logits": "-logits"}[inputs]
    record(benchmark, f"loss-{mode}-{B}x{C}x{K}-{str(dtype)[6:]}-{DEVICE}{suffix}", provider, DEVICE,
           baseline=provider == "reference", shape=[B, C, K, D if features else 0], dtype=dtype, mode=mode)  # fmt: skip
    rounds = 50 if HAS_CUDA or B * C <= 128 * 100 else 10
    if mode == "full":
        benchmark.pedantic(full, rounds=rounds, warmup_rounds=2)
    elif mode == "forward":
        benchmark.pedantic(fwd_only, rounds=rounds, warmup_rounds=2)
    else:

        def setup():
            for t in leaves:
                t.grad = None
            loss = forward()
            sync(DEVICE)
            return (loss,), {}

        def backward(loss):
            loss.backward()
            sync(DEVICE)

        benchmark.pedantic(backward, setup=setup, rounds=rounds, warmup_rounds=2)


def isa_table(repeats=30, steps=10, isas=None):
    """The full step at 128 x 100 x 3, D = 512, float32, with and without features, for the reference and the
    torch backend with its kernel built for each instruction set this CPU runs, the students given as lists and
    stacked: the fastest of ``repeats`` batches of ``steps`` steps in CPU time of this thread (robust on a shared
    machine, unlike wall-clock time with several OpenMP threads), one intra-op thread, every figure of a build
    interleaved in one loop. Feature share = 1 - logits only / with features; "logits+pass": the logits-only step
    with a plain elementwise pass over the feature term's bytes added (see ``step``), and "share floor" the feature
    share that pass alone gives: the part of the feature term that is memory traffic on this machine, not the loss's
    work. ``python bench/bench_loss.py``."""
    import time

    torch.set_num_threads(1)

    def step(backend, features, stacked, plain_pass=False):
        """One step; ``plain_pass``: logits only, plus a plain elementwise pass moving the feature term's bytes
        (the K student features and the teacher's read, a fresh [K, B, D] written and kept until the next step,
        as a gradient is) between the forward and the backward: the floor any feature term has on this machine."""
        teacher, students, target, f_t, f_s = _inputs(128, 100, torch.float32, stacked=stacked)
        leaves = _leaves(teacher, students, f_s)
        feats = (f_t, f_s) if features else ()
        kept = [None]

        def run():
            for t in leaves:
                t.grad = None
            kept[0] = None
            loss = teskd_loss(teacher, students, target, *feats, backend=backend)
            if plain_pass:
                with torch.no_grad():
                    out = torch.empty((K, *f_t.shape))
                    for k in range(K):
                        torch.sub(f_s[k], f_t, out=out[k])
                kept[0] = out
            loss.backward()

        return run

    builds = {"torch": "native", **ISA_PROVIDERS}
    builds = {provider: isa for provider, isa in builds.items() if isas is None or isa in isas}
    print(f"{'provider':14s} {'built for':9s} {'form':8s} {'features':>9s} {'logits':>9s} {'reference':>10s} "
          f"{'speed-up':>8s} {'feature share':>13s} {'logits+pass':>11s} {'share floor':>11s}")  # fmt: skip
    for provider, isa in builds.items():
        os.environ[cpu_kernel.ENV_ISA] = isa
        built = cpu_kernel.reload()
        fns = {"reference": step("reference", True, False)}
        for form, stacked in (("list", False), ("stacked", True)):
            fns[form, "features"] = step("torch", True, stacked)
            fns[form, "logits"] = step("torch", False, stacked)
            fns[form, "pass"] = step("torch", False, stacked, plain_pass=True)
        best = dict.fromkeys(fns, float("inf"))
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.thread_time()
                for _ in range(steps):
                    fn()
                best[name] = min(best[name], (time.thread_time() - start) / steps)
        for form in ("list", "stacked"):
            with_f, logits, ref = best[form, "features"], best[form, "logits"], best["reference"]
            floor = best[form, "pass"]
            print(f"{provider:14s} {built:9s} {form:8s} {with_f * 1e6:7.0f}us {logits * 1e6:7.0f}us "
                  f"{ref * 1e6:8.0f}us {ref / with_f:7.2f}x {1 - logits / with_f:13.2f} "
                  f"{floor * 1e6:9.0f}us {1 - logits / floor:11.2f}")  # fmt: skip


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The fused CPU loss per instruction-set build, in CPU time.")
    parser.add_argument("--repeats", type=int, default=30, help="batches of steps; the fastest counts (default 30)")
    parser.add_argument("--steps", type=int, default=10, help="steps per batch (default 10)")
    parser.add_argument("--isa", nargs="+", choices=("native", "avx2", "generic"), help="builds (default: all)")
    args = parser.parse_args()
    isa_table(args.repeats, args.steps, args.isa)
