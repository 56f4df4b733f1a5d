"""Shared pieces of the benchmarks: device sync, environment info, and how a figure is recorded.

Every benchmark sets ``benchmark.group`` (one group = one comparison, e.g. ``loss-full-128x100x3-float32-cpu``)
and calls :func:`record` with its provider name and whether it is the group's baseline. The conftest prints
and writes a summary table (group, provider, median, ratio to the baseline) at the end of the run.
"""

import platform
import resource

import torch


def sync(device):
    """Wait for the device, inside the timed function, so that a figure covers the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def versions():
    info = {"torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import nvidia.dali as dali

        info["dali"] = dali.__version__
    except ImportError:
        info["dali"] = None
    return info


def record(benchmark, group, provider, device, baseline=False, dtype=None, shape=None, **info):
    """Name the comparison and the provider of a benchmark and attach the environment to it.

    Every figure carries its device name, dtype, problem shape and library versions; the conftest adds its
    speed-up against the group's baseline (``speedup_vs_baseline``) to the saved JSON and the summary table.
    """
    benchmark.group = group
    benchmark.extra_info.update(
        provider=provider,
        baseline=baseline,
        device=device_name(device),
        dtype=None if dtype is None else str(dtype).replace("torch.", ""),
        shape=None if shape is None else list(shape),
        **versions(),
        **info,
    )


def cpu_peak_rss_mib():
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
