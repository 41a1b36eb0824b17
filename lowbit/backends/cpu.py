"""The C++ CPU backend: ``lowbit._C`` kernels in ``csrc/cpu`` (AVX-512 / AVX2 / scalar, chosen at run time)."""

from __future__ import annotations

import torch

from lowbit.backends import _extension

DEVICES = ("cpu",)
CHECKS_VALUES = True  # the C++ ops reject non-positive/non-finite steps and non-finite offsets/probs themselves


def availability() -> tuple[bool, str]:
    ext, reason = _extension.load()
    if ext is None:
        return False, reason
    return True, f"C++ kernels, {torch.ops.lowbit_C.cpu_isa()} selected at run time"


def fake_quant_forward(x, step, offset, qmin: int, qmax: int, inner: int) -> torch.Tensor:
    return torch.ops.lowbit_C.fake_quant_forward(x, step, offset, qmin, qmax, inner)


def fake_quant_backward(grad, x, step, offset, qmin: int, qmax: int, inner: int, grad_scale: float):
    return torch.ops.lowbit_C.fake_quant_backward(grad, x, step, offset, qmin, qmax, inner, grad_scale)


def multi_branch_forward(x, steps, probs, qmin, qmax) -> torch.Tensor:
    return torch.ops.lowbit_C.multi_branch_forward(x, steps, probs, qmin, qmax)


def multi_branch_backward(grad, x, steps, probs, qmin, qmax, grad_scale):
    return torch.ops.lowbit_C.multi_branch_backward(grad, x, steps, probs, qmin, qmax, grad_scale)
