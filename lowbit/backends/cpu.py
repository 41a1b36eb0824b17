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
    return True, f"C++ kernels, {torch.ops.lowbit_C.cpu_isa()} selected at run time"
