"""The kernel functions of the compiled extension, shared by the ``cpu`` and ``cuda`` backends.

They call the same ``lowbit_C`` ops; the dispatcher routes each call to the CPU or CUDA kernel by the tensors'
device, so the two backends differ only in which devices they serve and how they report availability.
"""

from __future__ import annotations

import torch


def fake_quant_forward(x, step, offset, qmin: int, qmax: int, inner: int) -> torch.Tensor:
    return torch.ops.lowbit_C.fake_quant_forward(x, step, offset, qmin, qmax, inner)


def fake_quant_backward(grad, x, step, offset, qmin: int, qmax: int, inner: int, grad_scale: float):
    return torch.ops.lowbit_C.fake_quant_backward(grad, x, step, offset, qmin, qmax, inner, grad_scale)


def multi_branch_forward(x, steps, probs, qmin, qmax) -> torch.Tensor:
    return torch.ops.lowbit_C.multi_branch_forward(x, steps, probs, qmin, qmax)


def multi_branch_backward(grad, x, steps, probs, qmin, qmax, grad_scale):
    return torch.ops.lowbit_C.multi_branch_backward(grad, x, steps, probs, qmin, qmax, grad_scale)


def packed_linear(x, packed_w, w_scale, w_bits: int, x_step, qmin: int, qmax: int, bias) -> torch.Tensor:
    return torch.ops.lowbit_C.packed_linear(x, packed_w, w_scale, w_bits, x_step, qmin, qmax, bias)
