"""Test set-up shared by every file.

Triton kernels run in the Triton interpreter on CPU tensors when no GPU is present. The interpreter is chosen
when triton is first imported, so TRITON_INTERPRET is set here, before any test module imports lowbit (and
lowbit imports triton only lazily, on the first Triton kernel call).
"""

from __future__ import annotations

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import lowbit  # noqa: E402
from lowbit.backends import cpu as cpu_backend

# Tests run on this device; `make gpu-check` sets LOWBIT_TEST_DEVICE=cuda.
DEVICE = torch.device(os.environ.get("LOWBIT_TEST_DEVICE", "cpu"))
# Triton kernels run in the (slow) interpreter. Tests shrink their Triton shapes under it and only under it: on a
# GPU every backend runs the full shapes.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreted(variant: str) -> bool:
    """Whether backend variant ``variant`` (a backend_variants() name) runs its kernels in the Triton interpreter."""
    return variant == "triton" and TRITON_INTERPRETED


def backend_variants() -> list[str]:
    """Every backend that can run on DEVICE, with the C++ CPU backend split by instruction set.
    LOWBIT_TEST_BACKENDS=cpu (comma-separated names) keeps only those backends: `make test` uses it for its runs
    with a capped LOWBIT_CPU_ISA, which need not repeat the reference and Triton cases."""
    only = [name for name in os.environ.get("LOWBIT_TEST_BACKENDS", "").split(",") if name]
    variants = []
    for name in lowbit.backends():
        if DEVICE.type not in _devices(name) or (only and name not in only):
            continue
        if name == "cpu":
            variants += [f"cpu-{isa}" for isa in cpu_backend.supported_isas()]
        else:
            variants.append(name)
    return variants


def _devices(name: str) -> tuple[str, ...]:
    from lowbit.backends import status

    return status(name).devices


@pytest.fixture(params=backend_variants())
def backend(request):
    """Runs the test body under one backend (and, for the C++ CPU backend, one instruction set)."""
    name, _, isa = request.param.partition("-")
    previous_isa = cpu_backend.isa() if isa else None
    if isa:
        cpu_backend.set_isa(isa)
    try:
        with lowbit.use_backend(name):
            yield request.param
    finally:
        if previous_isa:
            cpu_backend.set_isa(previous_isa)
