"""The reference backend: SPEC section 1 written as plain PyTorch ops.

It is the readable statement of the math and the fallback for any device. It is *not* what the tests compare
against (they carry their own float64 reference), and it is slow: every line below is a full pass over memory
and most allocate an element-sized temporary, which is what the fused kernels avoid.
"""

from __future__ import annotations

import torch

from lowbit.core.packing import unpack_codes

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


def _branch_codes(xf, step, qmin: int, qmax: int):
    v = xf / step
    rounded = torch.round(v)
    return v, rounded, torch.clamp(rounded, qmin, qmax)


def multi_branch_forward(x, steps, probs, qmin: list[int], qmax: list[int]) -> torch.Tensor:
    """The aggregated form: every branch quantizes x, the results are weighted and summed in branch order."""
    xf = x.float()
    y = torch.zeros_like(xf)
    for step, prob, lo, hi in zip(steps, probs, qmin, qmax, strict=True):
        y = y + prob * (_branch_codes(xf, step, lo, hi)[2] * step)
    return y.to(x.dtype)


def multi_branch_backward(grad, x, steps, probs, qmin: list[int], qmax: list[int], grad_scale: list[float]):
    xf, g = x.float(), grad.float()
    coef = torch.zeros_like(xf)
    dsteps, dprobs = [], []
    for step, prob, lo, hi, gs in zip(steps, probs, qmin, qmax, grad_scale, strict=True):
        v, rounded, q = _branch_codes(xf, step, lo, hi)
        inside = (v >= lo) & (v <= hi)
        dq_ds = torch.where(inside, rounded - v, torch.where(v < lo, float(lo), float(hi)))
        coef = coef + prob * inside
        dsteps.append(prob * gs * (g * dq_ds).sum(dtype=torch.float64))
        dprobs.append((g * q * step).sum(dtype=torch.float64))
    dx = (g * coef).to(x.dtype)
    return dx, torch.stack(dsteps).float(), torch.stack(dprobs).float()


def packed_linear(x, packed_w, w_scale, w_bits: int, x_step, qmin: int, qmax: int, bias) -> torch.Tensor:
    """SPEC section 4 as plain ops: quantize x, unpack W, exact integer dot products (float64 holds every
    partial sum of K <= 2^20 8-bit products exactly), then the float32 epilogue every backend shares."""
    xf = x.float()
    qx = torch.clamp(torch.round(xf / x_step), qmin, qmax)
    qw = unpack_codes(packed_w, w_bits, x.shape[-1], signed=True)
    acc = (qx.double() @ qw.double().t()).float()
    y = acc * (x_step * w_scale)
    if bias is not None:
        y = y + bias
    y = torch.where(torch.isnan(xf).any(dim=1, keepdim=True), float("nan"), y)
    return y.to(x.dtype)
