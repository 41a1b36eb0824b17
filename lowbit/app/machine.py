"""What machine this is: the CPU's name and the instruction-set features lowbit's kernels care about.

Shared by ``lowbit info`` and the benchmark reports; imports nothing from lowbit, so any layer of the app (and the
benchmark scripts) may use it."""

from __future__ import annotations

import platform

CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx2", "fma", "f16c")


def cpu_description() -> dict:
    """``{"model": the CPU's marketing name, "features": the CPU_FLAGS it has}`` from /proc/cpuinfo; elsewhere the
    platform's processor name and no features (they are only read on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if flags and model:
                    break
    except OSError:  # not Linux: the platform's name is the best there is
        pass
    return {"model": model, "features": [f for f in CPU_FLAGS if f in flags]}


def cpu_name() -> str:
    return cpu_description()["model"] or platform.processor()
