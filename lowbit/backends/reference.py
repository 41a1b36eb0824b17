"""The reference backend: SPEC section 1 written as plain PyTorch ops.

It is the readable statement of the math and the fallback for any device. It is *not* what the tests compare
against (they carry their own float64 reference), and it is slow: every line below is a full pass over memory
and most allocate an element-sized temporary, which is what the fused kernels avoid.
"""

from __future__ import annotations

import torch

DEVICES = ("cpu", "cuda")


def availability() -> tuple[bool, str]:
    return True, "plain PyTorch ops: the readable statement of SPEC, slow"


def _channel_view(x: torch.Tensor, param: torch.Tensor, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as (outer, C, inner) float32 and ``param`` shaped to broadcast over it."""
    channels = param.numel()
    return x.float().reshape(-1, channels, inner), param.view(1, channels, 1)


def fake_quant_forward(x, step, offset, qmin: int, qmax: int, inner: int) -> torch.Tensor:
    xf, s = _channel_view(x, step, inner)
    beta = 0.0 if offset is None else offset.view(1, -1, 1)
    v = (xf - beta) / s
    y = torch.clamp(torch.round(v), qmin, qmax) * s + beta
    return y.reshape(x.shape).to(x.dtype)


def fake_quant_backward(grad, x, step, offset, qmin: int, qmax: int, inner: int, grad_scale: float):
    xf, s = _channel_view(x, step, inner)
    g = grad.float().reshape(xf.shape)
    beta = 0.0 if offset is None else offset.view(1, -1, 1)
    v = (xf - beta) / s
    inside = (v >= qmin) & (v <= qmax)
    outside_value = torch.where(v < qmin, float(qmin), float(qmax))
    dq_ds = torch.where(inside, torch.round(v) - v, outside_value)
    dx = (g * inside).reshape(x.shape).to(x.dtype)
    dstep = (g * dq_ds).sum(dim=(0, 2)) * grad_scale
    doffset = (g * ~inside).sum(dim=(0, 2)) * grad_scale
    return dx, dstep, doffset
