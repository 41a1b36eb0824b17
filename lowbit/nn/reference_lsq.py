"""The LSQ module most repositories carry: plain PyTorch, round-pass and grad-scale tricks.

It is what ``lowbit.swap_fused`` replaces, and the baseline of the layer benchmarks. Its numerics are LSQ's
(SPEC section 1): ``clamp`` before ``round`` gives the same values as after, and the straight-through
``round_pass`` over ``clamp`` gives the LSQ gradients. It costs about ten elementwise passes where the fused
op makes two.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.core import checks
from lowbit.ops import quant_range

# Both tricks are written so that the forward value is exact: the usual `(x - x * g).detach() + x * g` and
# `(x.round() - x).detach() + x` can be off by an ulp, which moves values that sit on a rounding tie.


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward: x. Backward: gradient times ``scale``."""
    scaled = x * scale
    return x.detach() + (scaled - scaled.detach())


def round_pass(x: torch.Tensor) -> torch.Tensor:
    """Forward: round(x). Backward: identity (straight-through)."""
    return x.round().detach() + (x - x.detach())


class ReferenceLSQ(nn.Module):
    """LSQ fake quantization written with PyTorch ops: per-tensor, or per-channel along ``axis``."""

    def __init__(self, bits: int, *, signed: bool = False, channels: int | None = None, axis: int = 0):
        super().__init__()
        self.bits = checks.bits("bits", bits)
        self.signed = checks.flag("signed", signed)
        self.axis = axis if channels is not None else None
        self.step = nn.Parameter(torch.ones(channels if channels is not None else 1))

    @classmethod
    def from_lsq(cls, quantizer: nn.Module) -> ReferenceLSQ:
        """The plain-PyTorch twin of a ``lowbit.nn.LSQQuantizer`` (same bits, range, granularity and step):
        the inverse of ``swap_fused``, for comparisons and benchmarks."""
        per_channel = quantizer.axis is not None
        ref = cls(
            quantizer.bits,
            signed=quantizer.signed,
            channels=quantizer.step.numel() if per_channel else None,
            axis=quantizer.axis if per_channel else 0,
        )
        with torch.no_grad():
            ref.step.copy_(quantizer.step)
        return ref.to(quantizer.step.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qn, qp = quant_range(self.bits, self.signed)
        per_step = x.numel() // self.step.numel()
        s = grad_scale(self.step, 1.0 / math.sqrt(per_step * qp))
        if self.axis is not None:
            shape = [1] * x.dim()
            shape[self.axis] = -1
            s = s.view(shape)
        return round_pass(torch.clamp(x / s, qn, qp)) * s

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, axis={self.axis}"
