"""The CUDA backend: ``lowbit._C`` kernels in ``csrc/cuda`` (built only with a CUDA toolkit and a CUDA torch)."""

from __future__ import annotations

import torch

from lowbit.backends import _extension

DEVICES = ("cuda",)


def availability() -> tuple[bool, str]:
    ext, reason = _extension.load()
    if ext is None:
        return False, reason
    if not _extension.has_kernel("fake_quant_forward", "CUDA"):
        return False, "lowbit._C was built without CUDA kernels (no CUDA toolkit or CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, f"CUDA kernels on {torch.cuda.get_device_name()}"


def fake_quant_forward(x, step, offset, qmin: int, qmax: int, inner: int) -> torch.Tensor:
    return torch.ops.lowbit_C.fake_quant_forward(x, step, offset, qmin, qmax, inner)


def fake_quant_backward(grad, x, step, offset, qmin: int, qmax: int, inner: int, grad_scale: float):
    return torch.ops.lowbit_C.fake_quant_backward(grad, x, step, offset, qmin, qmax, inner, grad_scale)


def multi_branch_forward(x, steps, probs, qmin, qmax) -> torch.Tensor:
    return torch.ops.lowbit_C.multi_branch_forward(x, steps, probs, qmin, qmax)


def multi_branch_backward(grad, x, steps, probs, qmin, qmax, grad_scale):
    return torch.ops.lowbit_C.multi_branch_backward(grad, x, steps, probs, qmin, qmax, grad_scale)
