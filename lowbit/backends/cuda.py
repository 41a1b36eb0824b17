"""The CUDA backend: ``lowbit._C`` kernels in ``csrc/cuda`` (built only with a CUDA toolkit and a CUDA torch)."""

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

DEVICES = ("cuda",)


def availability() -> tuple[bool, str]:
    ext, reason = extension.load()
    if ext is None:
        return False, reason
    if not extension.has_kernel("fake_quant_forward", "CUDA"):
        return False, "lowbit._C was built without CUDA kernels (no CUDA toolkit or CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, f"CUDA kernels on {torch.cuda.get_device_name()}"
