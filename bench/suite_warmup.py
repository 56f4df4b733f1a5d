"""The GPU suite's warm-up: the expensive compiles of the later stages, once, early and in the background.

Usage::

    python bench/suite_warmup.py run WORK [--dry-run]                  # bench/gpu_suite.sh starts it after install
    python bench/suite_warmup.py wait WORK GRAPH SECONDS -- CMD ...     # wait (bounded) for GRAPH, then exec CMD

``run`` compiles, in the order the stages need them, the graphs that the step and end-to-end stages compile, so
that those find them in Inductor's FX graph cache and AOTAutograd's cache (``TORCHINDUCTOR_CACHE_DIR``, which
the suite exports to every process) instead of compiling them cold under their caps:

- ``step``: the step stage's compiled fast ResNet-18 train step, built as ``bench_models.test_cuda_train_step``
  builds it (ImageNet stem, batch 256, 224 px, bf16 autocast, channels-last, ``configure_backends``,
  ``bench_models.make_step``): its forward and backward graphs, two steps;
- ``e2e``: ``teskd-train`` with the end-to-end stage's own command (``suite_e2e.command``) on 512 training and 256
  test images of the same format, one epoch: its train and eval graphs (batch 256).

Each graph, when done, appends ``{"graph", "ok", "seconds", "end"}`` to ``WORK/warmup.jsonl``. ``--dry-run`` (no
CUDA): the same on the CPU and not compiled, the plumbing only (the dry run's tiny step; the dry-run e2e command
for one step). ``wait`` returns at once when the warm-up has finished GRAPH or is no longer running.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def _record(work, graph, ok, start, **extra):
    line = {"graph": graph, "ok": ok, "seconds": round(time.time() - start, 1), "end": round(time.time(), 1), **extra}
    with open(work / "warmup.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"warm-up: {graph} {'done' if ok else 'FAILED'} in {line['seconds']} s", flush=True)


def warm_step(dry_run):
    """The step stage's compiled step (on the dry run: its tiny CPU step, eager)."""
    import bench_models

    import teskd_fast
    from teskd_fast.device import configure_backends

    torch.manual_seed(0)
    if dry_run:
        model = teskd_fast.create_model("resnet18", 10, stem="cifar", formulation="fast", width=0.125)
        bench_models.make_step(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))()
        return
    # As bench_models.test_cuda_train_step builds its "fast-bf16-cl-compiled" provider: the same graph.
    device = torch.device("cuda", torch.cuda.current_device())
    configure_backends(device)
    x = torch.randn(256, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (256,), device=device)
    model = teskd_fast.create_model("resnet18", 1000, stem="imagenet", formulation="fast").to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    step = bench_models.make_step(model, x, y, compiled=teskd_fast.compile_model(model), autocast=torch.bfloat16)
    for _ in range(2):
        step()


def warm_e2e(work, dry_run):
    """teskd-train with the end-to-end stage's command, one short epoch (its train and eval graphs)."""
    import suite_e2e

    data = suite_e2e.write_cifar10(work / "warmup" / "data", *((64, 32) if dry_run else (512, 256)))
    args = [sys.executable, "-m", "teskd_fast.train", *suite_e2e.command(data, work / "warmup" / "run", dry_run),
            "--epochs", "1", "--steps-per-epoch", "1" if dry_run else "2", "--no-progress"]
    print("warm-up:", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def run(work, dry_run):
    work.mkdir(parents=True, exist_ok=True)
    print(f"warm-up: TORCHINDUCTOR_CACHE_DIR={os.environ.get('TORCHINDUCTOR_CACHE_DIR', '(default)')}", flush=True)
    status = 0
    for graph, warm in (("step", lambda: warm_step(dry_run)), ("e2e", lambda: warm_e2e(work, dry_run))):
        start = time.time()
        try:
            warm()
            _record(work, graph, True, start)
        except Exception as e:  # one graph failing leaves the other to warm; the stage compiles it itself
            _record(work, graph, False, start, error=f"{type(e).__name__}: {str(e).strip()[:300]}")
            status = 1
    return status


def warmed(work, graph):
    """The warm-up's line for ``graph``, or None."""
    try:
        lines = (work / "warmup.jsonl").read_text().splitlines()
    except OSError:
        return None
    return next((json.loads(line) for line in lines if line.strip() and json.loads(line)["graph"] == graph), None)


def running(work):
    try:
        os.kill(int((work / "warmup.pid").read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def wait(work, graph, seconds):
    start = time.time()
    while warmed(work, graph) is None and running(work) and time.time() - start < seconds:
        time.sleep(0.2)
    line = warmed(work, graph)
    state = "not warmed (the warm-up is not running)" if line is None and not running(work) else \
        "still compiling in the warm-up" if line is None else f"warmed ({'ok' if line['ok'] else 'failed'})"
    print(f"warm-up wait: {graph} {state}; waited {time.time() - start:.1f} s of at most {seconds} s", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "run":
        return run(Path(argv[1]), "--dry-run" in argv[2:])
    if len(argv) >= 6 and argv[0] == "wait" and argv[4] == "--":
        wait(Path(argv[1]), argv[2], float(argv[3]))
        sys.stdout.flush()
        os.execvp(argv[5], argv[5:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
