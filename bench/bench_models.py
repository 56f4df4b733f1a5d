"""TESKD networks: multiply-accumulates, and the cost of a training step, faithful versus fast.

Groups:
- ``models-macs-imagenet-r18-224``: forward MACs per 224x224 image (torch.utils.flop_counter), faithful (6.36 G)
  versus fast (target <= 5.6 G), with the forward time at batch 1.
- ``models-step-cifar-r18-b32-float32-cpu``: CIFAR-stem ResNet-18, batch 32, float32, forward + TESKD loss +
  backward + SGD step (teskd-train's fused SGD); faithful (baseline) versus fast (target >= 1.4x), fast compiled,
  and a plain torchvision ResNet-18 step (cross-entropy) for the students' overhead. Peak memory of one step is
  recorded.
- every TESKD step uses the loss's ``auto`` backend (Triton on CUDA), as ``teskd-train`` does.
- ``models-step-imagenet-r18-b256-cuda``: ImageNet-stem ResNet-18, batch 256, 224x224: the reference's stack
  (faithful, eager, fp16 autocast with GradScaler, NCHW, plain SGD; baseline) versus fast + channels-last + bf16 +
  compile + fused SGD (target >= 2.5x), and a plain torchvision ResNet-18 on the fast stack (target: TESKD step
  <= 3.3x of it). All three under teskd-train's backend settings (``teskd_fast.device.configure_backends``).
  Skipped without CUDA.

- ``models-student-cost-r18-<32|224>-<cpu|cuda>``: ResNet-18's TESKD step over the plain step at student widths
  512, 256, 128 and levels 3,2,1 and 3,2, beside the students' MACs over the backbone's (:func:`student_cost_table`,
  interleaved rounds; ``python bench/bench_models.py 32 224`` prints the CPU tables as JSON). CUDA: marked gpu.

Set ``TESKD_BENCH_ROUNDS`` to change the number of timed steps (default 5).
"""

import functools
import os
import statistics
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from common import cpu_peak_rss_mib, record, sync
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import teskd_fast
from teskd_fast.device import configure_backends
from teskd_fast.train.build import sgd

HAS_CUDA = torch.cuda.is_available()
ROUNDS = int(os.environ.get("TESKD_BENCH_ROUNDS", "5"))
# Medians of this run by (group, provider): the students' overhead is the TESKD step over the plain step.
MEDIANS = {}
CPU_MEDIANS = {}
CPU_GROUP = "models-step-cifar-r18-b32-float32-cpu"
CUDA_GROUP = "models-step-imagenet-r18-b256-cuda"
TINY_GROUP = "models-step-tiny-cifar-r18w0.125-b4-cpu"
BASELINES = {CPU_GROUP: "faithful", CUDA_GROUP: "faithful-fp16-nchw-eager", TINY_GROUP: "faithful"}


def forward_macs(model, x):
    """Multiply-accumulates of one forward (flop_counter counts 2 FLOPs per multiply-accumulate)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2


def cpu_step_peak_mib(fn):
    """Peak of the memory allocated during ``fn()`` above what was allocated before it, in MiB (CPU profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak / 2**20


def plain_resnet18(num_classes, stem):
    net = torchvision.models.resnet18(num_classes=num_classes)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    return net


def make_step(model, x, y, compiled=None, autocast=None, scaler=None, plain_sgd=False):
    """One training step as teskd-train takes it: forward, TESKD loss (cross-entropy for a plain network),
    backward, SGD (the recipe's).

    The loss is ``teskd_loss`` with its ``auto`` backend, as :func:`teskd_fast.train.build.build_criterion` makes
    it (Triton on CUDA, the torch backend on the CPU); the SGD teskd-train's (PyTorch's fused SGD,
    :func:`teskd_fast.train.build.sgd`), or with ``plain_sgd`` the plain ``torch.optim.SGD`` of the reference's
    stack. The step carries them as ``step.loss`` and ``step.optimizer``.
    """
    forward = compiled if compiled is not None else model
    make_sgd = torch.optim.SGD if plain_sgd else sgd
    optimizer = make_sgd(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    teskd = functools.partial(teskd_fast.teskd_loss, backend="auto")
    device = x.device

    def step():
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = forward(x)
            if isinstance(out, torch.Tensor):
                loss = F.cross_entropy(out, y)
            else:
                loss = teskd(out.logits, out.student_logits, y, out.feature, out.student_features)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        sync(device)

    step.loss, step.optimizer = teskd, optimizer
    return step


def run_step(benchmark, group, provider, step, device, batch, baseline=False, warmup=2, **info):
    model_info = dict(info)
    for _ in range(warmup):
        step()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        model_info["peak_step_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        model_info["peak_step_mib"] = round(cpu_step_peak_mib(step), 1)
    record(benchmark, group, provider, device, baseline=baseline, batch=batch, **model_info)
    # Process CPU seconds per step beside the wall clock: on a shared CPU the wall clock also counts other
    # processes' time slices (and OpenMP threads waiting for them), CPU time much less so.
    cpu_seconds = []

    def timed_step():
        start = time.process_time()
        step()
        cpu_seconds.append(time.process_time() - start)

    benchmark.pedantic(timed_step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    cpu_median = statistics.median(cpu_seconds[1:] or cpu_seconds)
    MEDIANS[group, provider] = median
    CPU_MEDIANS[group, provider] = cpu_median
    benchmark.extra_info["images_per_s"] = round(batch / median, 1)
    benchmark.extra_info["cpu_seconds_median"] = round(cpu_median, 4)
    base = CPU_MEDIANS.get((group, BASELINES.get(group)))
    if base is not None:
        benchmark.extra_info["cpu_time_speedup_vs_baseline"] = round(base / cpu_median, 3)
    plain = MEDIANS.get((group, "torchvision-resnet18"))
    if plain is not None and provider != "torchvision-resnet18":
        benchmark.extra_info["step_over_plain_resnet18"] = round(median / plain, 2)
        benchmark.extra_info["cpu_time_over_plain_resnet18"] = round(
            cpu_median / CPU_MEDIANS[group, "torchvision-resnet18"], 2
        )
    benchmark.extra_info["process_peak_rss_mib"] = round(cpu_peak_rss_mib(), 1)
    if torch.device(device).type == "cuda":
        # Whether the compiles found the GPU suite's warm-up in Inductor's FX graph cache (this process so far).
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        benchmark.extra_info["fxgraph_cache"] = (f"{inductor['fxgraph_cache_hit']} hit, "
                                                 f"{inductor['fxgraph_cache_miss']} miss")


@pytest.mark.smoke
@pytest.mark.parametrize("formulation", ["faithful", "fast"])
def test_macs_imagenet_resnet18(benchmark, formulation):
    model = teskd_fast.create_model("resnet18", 1000, stem="imagenet", formulation=formulation).eval()
    x = torch.randn(1, 3, 224, 224)
    macs = forward_macs(model, x)
    if formulation == "fast":
        assert macs <= 5.6e9, f"fast formulation: {macs / 1e9:.3f} G MACs > 5.6 G"
    else:
        assert abs(macs - 6.36e9) < 0.01e9, f"faithful formulation: {macs / 1e9:.3f} G MACs, the method states 6.36 G"
    plain = forward_macs(plain_resnet18(1000, "imagenet").eval(), x)
    record(
        benchmark,
        "models-macs-imagenet-r18-224",
        formulation,
        "cpu",
        baseline=formulation == "faithful",
        gmacs=round(macs / 1e9, 3),
        plain_resnet18_gmacs=round(plain / 1e9, 3),
        batch=1,
        dtype=torch.float32,
        shape=[1, 3, 224, 224],
    )

    def forward():
        with torch.no_grad():
            model(x)

    benchmark.pedantic(forward, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.smoke
@pytest.mark.parametrize("formulation", ["faithful", "fast"])
def test_tiny_cpu_step(benchmark, formulation):
    torch.manual_seed(0)
    model = teskd_fast.create_model("resnet18", 10, stem="cifar", formulation=formulation, width=0.125)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    run_step(
        benchmark,
        TINY_GROUP,
        formulation,
        make_step(model, x, y),
        "cpu",
        4,
        baseline=formulation == "faithful",
        dtype="float32",
        shape=[4, 3, 32, 32],
    )


# The baseline first: the CPU-time ratios in extra_info are taken against the run's earlier providers.
@pytest.mark.parametrize("provider", ["faithful", "torchvision-resnet18", "fast", "fast-compiled"])
def test_cpu_train_step(benchmark, provider):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 100, (32,))
    compiled = None
    if provider == "torchvision-resnet18":
        model = plain_resnet18(100, "cifar")
    else:
        formulation = "faithful" if provider == "faithful" else "fast"
        model = teskd_fast.create_model("resnet18", 100, stem="cifar", formulation=formulation)
        if provider == "fast-compiled":
            compiled = teskd_fast.compile_model(model)
    macs = forward_macs(model, x[:1])
    step = make_step(model, x, y, compiled=compiled)
    run_step(
        benchmark,
        CPU_GROUP,
        provider,
        step,
        "cpu",
        32,
        baseline=provider == "faithful",
        gmacs_per_image=round(macs / 1e9, 3),
        dtype="float32",
        shape=[32, 3, 32, 32],
    )


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="CUDA benchmark: needs a GPU (the reference stack is fp16 autocast on CUDA)")
@pytest.mark.parametrize(
    "provider",
    # The plain network (a third cold compile) is left out of the GPU suite to fit its cap.
    ["faithful-fp16-nchw-eager", pytest.param("torchvision-resnet18", marks=pytest.mark.gpu_extra),
     "fast-bf16-cl-compiled"],
)
def test_cuda_train_step(benchmark, provider):
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    # teskd-train's backend settings (cuDNN autotuning, TF32 matmuls), recorded with the figure.
    backends = configure_backends(device)
    x = torch.randn(256, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (256,), device=device)
    if provider == "faithful-fp16-nchw-eager":
        # The reference's stack: eager, NCHW, fp16 autocast with loss scaling.
        model = teskd_fast.create_model("resnet18", 1000, stem="imagenet", formulation="faithful").to(device)
        step = make_step(model, x, y, autocast=torch.float16, scaler=torch.amp.GradScaler("cuda"), plain_sgd=True)
    else:
        if provider == "torchvision-resnet18":
            # The plain network on the fast stack, for the students' overhead.
            model = plain_resnet18(1000, "imagenet").to(device, memory_format=torch.channels_last)
        else:
            model = teskd_fast.create_model("resnet18", 1000, stem="imagenet", formulation="fast").to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        step = make_step(model, x, y, compiled=teskd_fast.compile_model(model), autocast=torch.bfloat16)
    run_step(
        benchmark,
        CUDA_GROUP,
        provider,
        step,
        device,
        256,
        baseline=provider == "faithful-fp16-nchw-eager",
        warmup=3,
        dtype="float16" if provider.startswith("faithful") else "bfloat16",
        shape=[256, 3, 224, 224],
        **backends,
    )


# The student-cost table (issue 30): widths x level sets of ResNet-18, TESKD step over the plain step.
STUDENT_WIDTHS = (512, 256, 128)
STUDENT_LEVEL_SETS = ((3, 2, 1), (3, 2))
# image side -> (stem, CPU batch, CUDA batch)
STUDENT_SIZES = {32: ("cifar", 32, 256), 224: ("imagenet", 4, 128)}


def student_cost_table(device, size, rounds=ROUNDS, autocast=None):
    """TESKD step / plain step of ResNet-18 at every student width and level set, beside the MAC ratio.

    Every network is built first; then each round times one step of every network in turn (plain first), so that
    a shared machine's load falls on all of them alike, and each ratio is of medians from the same rounds.

    Returns:
        ``{"plain_ms": float, "rows": [{"width", "levels", "students_over_backbone_macs", "step_ms",
        "step_over_plain"}, ...]}``.
    """
    stem, cpu_batch, cuda_batch = STUDENT_SIZES[size]
    batch = cuda_batch if torch.device(device).type == "cuda" else cpu_batch
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    plain = plain_resnet18(100, stem).to(device, memory_format=torch.channels_last)
    steps = {"plain": make_step(plain, x, y, autocast=autocast)}
    macs = {}
    for width in STUDENT_WIDTHS:
        for levels in STUDENT_LEVEL_SETS:
            model = teskd_fast.create_model("resnet18", 100, stem=stem, student_width=width, student_levels=levels)
            macs[width, levels] = teskd_fast.cost(model, size).ratio
            model = model.to(device)
            steps[width, levels] = make_step(model, x, y, autocast=autocast)
    times = {key: [] for key in steps}
    for step in steps.values():
        step()  # warm-up
        step()
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            sync(device)
            times[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(t) for key, t in times.items()}
    rows = [{"width": w, "levels": ",".join(map(str, lv)), "students_over_backbone_macs": round(macs[w, lv], 2),
             "step_ms": round(medians[w, lv] * 1e3, 1), "step_over_plain": round(medians[w, lv] / medians["plain"], 2)}
            for (w, lv) in macs]
    return {"plain_ms": round(medians["plain"] * 1e3, 1), "batch": batch, "rows": rows}


@pytest.mark.parametrize("size", sorted(STUDENT_SIZES))
def test_student_cost_cpu(benchmark, size):
    """``models-student-cost-r18-<size>-cpu``: the whole table in one timed call (its rows in extra_info)."""
    group = f"models-student-cost-r18-{size}-cpu"
    result = {}
    benchmark.pedantic(lambda: result.update(student_cost_table("cpu", size)), rounds=1, iterations=1)
    record(benchmark, group, "table", "cpu", baseline=True, load_average=os.getloadavg(), **result)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("size", sorted(STUDENT_SIZES))
def test_student_cost_cuda(benchmark, size):
    """``models-student-cost-r18-<size>-cuda``: as on the CPU, bf16 autocast, eager (the GPU suite)."""
    group = f"models-student-cost-r18-{size}-cuda"
    result = {}
    configure_backends("cuda")
    benchmark.pedantic(lambda: result.update(student_cost_table("cuda", size, autocast=torch.bfloat16)), rounds=1,
                       iterations=1)
    record(benchmark, group, "table", "cuda", baseline=True, **result)


if __name__ == "__main__":
    import json
    import sys

    torch.set_num_threads(int(os.environ.get("TESKD_BENCH_THREADS", "2")))
    for side in [int(a) for a in sys.argv[1:]] or sorted(STUDENT_SIZES):
        before = os.getloadavg()
        table = student_cost_table("cpu", side)
        print(json.dumps({"size": side, "load_before": before, "load_after": os.getloadavg(), **table}), flush=True)
