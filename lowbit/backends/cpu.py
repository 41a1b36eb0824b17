"""The C++ CPU backend: ``lowbit._C`` kernels in ``csrc/cpu`` (AVX-512 / AVX2 / scalar, chosen at run time)."""

from __future__ import annotations

import torch

from lowbit.backends import extension
from lowbit.backends.compiled import (  # noqa: F401  (the backend's kernel functions)
    fake_quant_backward,
    fake_quant_forward,
    multi_branch_backward,
    multi_branch_forward,
    packed_linear,
)

DEVICES = ("cpu",)
CHECKS_VALUES = True  # the C++ ops reject non-positive/non-finite steps and non-finite offsets/probs themselves


def availability() -> tuple[bool, str]:
    ext, reason = extension.load()
    if ext is None:
        return False, reason
    return True, f"C++ kernels, {isa()} selected at run time"


# Queries and switches of the C++ CPU code paths (tests, benchmarks and `lowbit info` use them).


def isa() -> str:
    """The instruction-set path the C++ kernels run now: "avx512", "avx2" or "scalar"."""
    return torch.ops.lowbit_C.cpu_isa()


def supported_isas() -> list[str]:
    """The paths this CPU can run, fastest first."""
    return list(torch.ops.lowbit_C.cpu_isa_supported())


def set_isa(name: str) -> None:
    """Caps the path (as LOWBIT_CPU_ISA does at start-up); for tests and benchmarks."""
    torch.ops.lowbit_C.set_cpu_isa(name)


def features() -> list[str]:
    """The optional CPU features in use (avx512_vnni, amx_int8)."""
    return list(torch.ops.lowbit_C.cpu_features())


def packed_path_counts() -> dict[str, int]:
    """How many packed GEMM calls each path (scalar, avx2, vnni, amx) has run in this process."""
    return dict(torch.ops.lowbit_C.packed_linear_path_counts())
