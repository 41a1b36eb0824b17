"""Wall-clock timing shared by the benchmarks and the demo: round-robin medians, with device syncs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times_ms(
    fns: dict[str, Callable[[], object]], device: torch.device | str, repeats: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Milliseconds of every call of each callable, timed round-robin (one call of each per round) so that every
    implementation sees the same machine state: thread-pool wake-ups, allocator and cache history, other load."""
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_median_ms(
    fns: dict[str, Callable[[], object]], device: torch.device | str, repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Median milliseconds of each callable, timed round-robin (``interleaved_times_ms``)."""
    times = interleaved_times_ms(fns, device, repeats, warmup)
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn: Callable[[], object], device: torch.device | str, repeats: int, warmup: int = 3) -> float:
    return interleaved_median_ms({"fn": fn}, device, repeats, warmup)["fn"]
