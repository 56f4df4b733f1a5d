"""Profile the GPU hot paths once, for bench/RESULTS.md: where the time of a loss call and of a train step goes.

Usage: python bench/profile_gpu.py OUT_DIR   (needs CUDA; bench/gpu_suite.sh runs it)

Writes OUT_DIR/profile_loss.txt (the fused loss at 256 x 1000 x 3 bf16: per-kernel device time, host time per
call in eager mode and as one CUDA-graph replay) and OUT_DIR/profile_step.txt (fast ImageNet ResNet-18 train step,
batch 128, bf16 + channels_last, as teskd-train takes it: configure_backends' settings, the loss's auto backend
and the fused SGD (bench_models.make_step); the top kernels by device time).
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import teskd_fast
from teskd_fast.device import configure_backends

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import make_step  # noqa: E402  (bench/ is not a package)


def _loss_inputs(B=256, C=1000, K=3, D=512, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    teacher = (torch.randn(B, C, device="cuda", generator=g) * 3).to(dtype).requires_grad_()
    students = (torch.randn(K, B, C, device="cuda", generator=g) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, C, (B,), device="cuda", generator=g)
    f_t = torch.randn(B, D, device="cuda", generator=g).clamp_min(0).to(dtype)
    f_s = torch.randn(K, B, D, device="cuda", generator=g).clamp_min(0).to(dtype).requires_grad_()
    return teacher, students, target, f_t, f_s


def _wall_us(fn, n=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e6


def profile_loss(out):
    teacher, students, target, f_t, f_s = _loss_inputs()
    lines = []
    for backend in ("triton", "reference"):

        def step(backend=backend):
            teacher.grad = students.grad = f_s.grad = None
            teskd_fast.teskd_loss(teacher, students, target, f_t, f_s, backend=backend).backward()

        lines.append(f"{backend}: eager fwd+bwd wall {_wall_us(step):.1f} us per call (256 x 1000 x 3, bf16)")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                step()
            torch.cuda.synchronize()
        lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))

    # The same call captured once in a CUDA graph: what remains is device time and one launch.
    def step():
        teacher.grad = students.grad = f_s.grad = None
        teskd_fast.teskd_loss(teacher, students, target, f_t, f_s, backend="triton").backward()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    lines.append(f"triton in a CUDA graph: replay wall {_wall_us(graph.replay):.1f} us per call")
    (out / "profile_loss.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(line for line in lines if "wall" in line))


def profile_step(out):
    """teskd-train's step (eager here): its process settings, the loss's auto backend, the fused SGD."""
    device = torch.device("cuda", torch.cuda.current_device())
    settings = configure_backends(device)
    model = teskd_fast.create_model("resnet18", 1000, stem="imagenet").to(device, memory_format=torch.channels_last)
    x = torch.randn(128, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (128,), device=device)
    step = make_step(model, x, y, autocast=torch.bfloat16)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    (out / "profile_step.txt").write_text(
        f"fast resnet18 eager bf16 channels_last, batch 128, 5 steps; loss backend auto, fused SGD, {settings}\n"
        f"{table}\n"
    )


def main():
    if not torch.cuda.is_available():
        sys.exit("profile_gpu.py needs a CUDA device")
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "profile")
    out.mkdir(parents=True, exist_ok=True)
    profile_loss(out)
    profile_step(out)


if __name__ == "__main__":
    main()
