"""Device-synchronised wall-clock timing shared by the search and the benchmark."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Run fn() and return (its result, seconds), synchronising the device before each clock read."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def summarize(seconds: list[float]) -> dict:
    """Median and spread of timed runs (warm-up runs already excluded)."""
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "runs": len(seconds)}


def device_info(device) -> dict:
    """What a latency was measured on: device class (cpu/cuda) and a readable name."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {"device_class": dev.type, "device_name": name, "torch": torch.__version__}
