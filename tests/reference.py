"""An independent statement of SPEC section 1 in NumPy, for the tests.

It shares no code with lowbit (not even lowbit.backends.reference). The forward is NumPy float32 arithmetic,
one IEEE rounding per operation, exactly as SPEC fixes the math ("true fp32 division", "internal math is
float32"), so every backend must match it bit for bit. The gradient sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


@dataclass
class FakeQuantResult:
    y: np.ndarray  # float32, before rounding to x's dtype
    dx: np.ndarray
    dstep: np.ndarray  # (C,)
    doffset: np.ndarray
    dstep_scale: np.ndarray  # sum of |terms| * grad_scale, to size the tolerance of a cancelling sum
    doffset_scale: np.ndarray


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def _channel_shape(ndim: int, axis: int | None, channels: int) -> tuple[int, ...]:
    shape = [1] * ndim
    if axis is not None and channels != 1:
        shape[axis] = channels
    return tuple(shape)


def fake_quant(x, step, bits, signed, offset=None, axis=None, grad=None, grad_scale=None) -> FakeQuantResult:
    """Forward and backward of LSQ fake quantization; ``axis`` None means per-tensor."""
    xs = as_np(x)
    steps = as_np(step).reshape(-1)
    channels = steps.size
    if axis is None and channels != 1:
        axis = 0
    axis = None if axis is None else axis % max(xs.ndim, 1)
    bshape = _channel_shape(xs.ndim, axis, channels)
    s = steps.reshape(bshape) if channels != 1 else steps.reshape(())
    beta = (
        np.zeros_like(s) if offset is None else np.broadcast_to(as_np(offset).reshape(-1), (channels,)).reshape(s.shape)
    )
    with np.errstate(invalid="ignore", over="ignore"):  # inf and NaN inputs are part of the contract
        return _fake_quant(xs, s, beta, channels, axis, bits, signed, grad, grad_scale)


def _fake_quant(xs, s, beta, channels, axis, bits, signed, grad, grad_scale) -> FakeQuantResult:
    qn, qp = qrange(bits, signed)
    s32, beta32 = s.astype(np.float32), beta.astype(np.float32)
    v32 = (xs.astype(np.float32) - beta32) / s32
    v = v32.astype(np.float64)
    q = np.clip(np.rint(v), qn, qp)
    q = np.where(np.isnan(v), np.nan, q)  # np.clip keeps NaN too; explicit for clarity
    y = (q.astype(np.float32) * s32) + beta32  # float32 ops, each rounded once, as SPEC fixes the math

    g = np.ones_like(xs) if grad is None else as_np(grad)
    inside = (v >= qn) & (v <= qp)
    dq_ds = np.where(inside, np.rint(v) - v, np.where(v < qn, qn, qp))
    n = xs.size // max(channels, 1)
    gs = grad_scale if grad_scale is not None else (1.0 / np.sqrt(n * qp) if n else 1.0)
    reduce_axes = tuple(i for i in range(xs.ndim) if not (channels != 1 and i == axis))
    term_s = g * dq_ds
    term_b = np.where(inside, 0.0, g)
    return FakeQuantResult(
        y=y,
        dx=np.where(inside, g, 0.0),
        dstep=(term_s.sum(axis=reduce_axes) * gs).reshape(-1),
        doffset=(term_b.sum(axis=reduce_axes) * gs).reshape(-1),
        dstep_scale=(np.abs(term_s).sum(axis=reduce_axes) * gs).reshape(-1),
        doffset_scale=(np.abs(term_b).sum(axis=reduce_axes) * gs).reshape(-1),
    )


def to_dtype(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """float32 or float64 NumPy values as a tensor of ``dtype`` (float32 first, then round to nearest even)."""
    return torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)  # a copy, 0-d stays 0-d


@dataclass
class MultiBranchResult:
    y: np.ndarray  # float32
    dx: np.ndarray  # float32
    dsteps: np.ndarray  # float64 (B,)
    dprobs: np.ndarray
    dsteps_scale: np.ndarray
    dprobs_scale: np.ndarray


def multi_branch(x, steps, probs, bits, signed, grad=None, grad_scale=None) -> MultiBranchResult:
    """SPEC section 2: y = sum_i p_i Q(x; s_i, b_i), summed in branch order in float32; float64 gradient sums."""
    xs = as_np(x).astype(np.float32)
    g64 = np.ones(xs.shape) if grad is None else as_np(grad)
    g32 = g64.astype(np.float32)
    s_all, p_all = as_np(steps).astype(np.float32), as_np(probs).astype(np.float32)
    y = np.zeros(xs.shape, np.float32)
    coef = np.zeros(xs.shape, np.float32)
    dsteps, dprobs, s_scale, p_scale = [], [], [], []
    with np.errstate(invalid="ignore", over="ignore"):
        for i, b in enumerate(bits):
            qn, qp = qrange(b, signed)
            s, p = s_all[i], p_all[i]
            v = (xs / s).astype(np.float64)
            q = np.clip(np.rint(v), qn, qp)
            branch = q.astype(np.float32) * s
            y = y + p * branch
            inside = (v >= qn) & (v <= qp)
            coef = coef + np.where(inside, p, np.float32(0))
            gs = grad_scale[i] if grad_scale is not None else (1.0 / np.sqrt(xs.size * qp) if xs.size else 1.0)
            term_s = g64 * np.where(inside, np.rint(v) - v, np.where(v < qn, qn, qp))
            term_p = g64 * branch.astype(np.float64)
            dsteps.append(float(p) * gs * term_s.sum())
            s_scale.append(abs(float(p)) * gs * np.abs(term_s).sum())
            dprobs.append(term_p.sum())
            p_scale.append(np.abs(term_p).sum())
        dx = g32 * coef
    return MultiBranchResult(y, dx, np.array(dsteps), np.array(dprobs), np.array(s_scale), np.array(p_scale))
