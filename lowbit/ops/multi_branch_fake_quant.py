"""``lowbit.multi_branch_fake_quant``: MetaMix's mixture of bit-widths of one activation (SPEC section 2) as the custom
op ``lowbit::multi_branch_fake_quant``, wired like ``lowbit.ops.fake_quant``.
"""

from __future__ import annotations

import math

import torch

from lowbit.backends import select
from lowbit.core import checks
from lowbit.core.ranges import quant_range
from lowbit.ops.library import (
    LIB,
    clip_arguments,
    define,
    in_logical_order,
    in_memory_order,
    memory_order,
    plain_eager,
    takes_fused_clip,
)

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# multi_branch_fake_quant: MetaMix's mixture of bit-widths of one activation (SPEC section 2)
# ---------------------------------------------------------------------------------------------------------------


def _branch_ranges(bits: list[int], signed: bool) -> tuple[list[int], list[int]]:
    ranges = [quant_range(b, signed) for b in bits]
    return [lo for lo, _ in ranges], [hi for _, hi in ranges]


def _multi_branch_impl(x, steps, probs, bits, signed, grad_scale, lo=-math.inf, hi=math.inf):
    if x.numel() == 0:
        return torch.empty_like(x)
    kernels = select(x.device).kernels  # checks the values of steps and probs
    qmin, qmax = _branch_ranges(bits, signed)
    order = memory_order(x)
    xm = in_memory_order(x, order)
    y = kernels.multi_branch_fake_quant_forward(
        xm, steps.contiguous(), probs.contiguous(), qmin, qmax, **clip_arguments(lo, hi)
    )
    return in_logical_order(y, order)


def _multi_branch_backward_impl(grad, x, steps, probs, bits, signed, grad_scale, lo=-math.inf, hi=math.inf):
    if x.numel() == 0:
        return torch.empty_like(x), torch.zeros_like(steps), torch.zeros_like(probs)
    qmin, qmax = _branch_ranges(bits, signed)
    order = memory_order(x)
    dx, dsteps, dprobs = select(x.device).kernels.multi_branch_fake_quant_backward(
        in_memory_order(grad, order),
        in_memory_order(x, order),
        steps.contiguous(),
        probs.contiguous(),
        qmin,
        qmax,
        grad_scale,
        **clip_arguments(lo, hi),
    )
    return in_logical_order(dx, order), dsteps, dprobs


define(
    "multi_branch_fake_quant(Tensor x, Tensor steps, Tensor probs, int[] bits, bool signed, float[] grad_scale) "
    "-> Tensor",
    _multi_branch_impl,
    lambda x, steps, probs, bits, signed, grad_scale: torch.empty_like(x),
)
define(
    "multi_branch_fake_quant_backward(Tensor grad, Tensor x, Tensor steps, Tensor probs, int[] bits, bool signed, "
    "float[] grad_scale) -> (Tensor, Tensor, Tensor)",
    _multi_branch_backward_impl,
    lambda grad, x, steps, probs, bits, signed, grad_scale: (
        torch.empty_like(x),
        torch.empty_like(steps),
        torch.empty_like(probs),
    ),
)


def _multi_branch_setup_context(ctx, inputs, output):
    x, steps, probs, bits, signed, grad_scale = inputs
    ctx.save_for_backward(x, steps, probs)
    ctx.config = (bits, signed, grad_scale)


def _multi_branch_grad(ctx, grad):
    x, steps, probs = ctx.saved_tensors
    backward = _multi_branch_backward_impl if plain_eager(grad) else torch.ops.lowbit.multi_branch_fake_quant_backward
    dx, dsteps, dprobs = backward(grad, x, steps, probs, *ctx.config)
    return dx, dsteps, dprobs, None, None, None


torch.library.register_autograd(
    "lowbit::multi_branch_fake_quant", _multi_branch_grad, setup_context=_multi_branch_setup_context, lib=LIB
)


def _branch_grad_scales(grad_scale, bits: list[int], signed: bool, per_step: int) -> list[float]:
    if grad_scale is None or isinstance(grad_scale, (int, float)):
        gs = checks.grad_scale(grad_scale)
        if gs is not None:
            return [gs] * len(bits)
        return [1.0 / math.sqrt(per_step * quant_range(b, signed)[1]) if per_step else 1.0 for b in bits]
    scales = [checks.grad_scale(g) for g in grad_scale]
    if len(scales) != len(bits):
        raise ValueError(f"grad_scale must be a float or have one entry per branch ({len(bits)}), got {len(scales)}")
    return scales


def multi_branch_fake_quant(
    x: Tensor,
    steps: Tensor,
    probs: Tensor,
    bits,
    *,
    signed: bool = False,
    grad_scale=None,
    clip: tuple[float, float] | None = None,
) -> Tensor:
    """Multi-branch quantizer ``y = sum_i probs[i] * Q(x; steps[i], bits[i])`` (SPEC section 2).

    Args:
        x: float32, float16 or bfloat16 tensor of any shape.
        steps: positive per-tensor step of each branch, shape ``(B,)``.
        probs: weight of each branch, shape ``(B,)`` (usually ``softmax(alpha)``; need not sum to 1).
        bits: the B bit-widths, distinct, each in 2..8, in any order.
        signed: signedness shared by every branch.
        grad_scale: LSQ gradient scale, one float for all branches or one per branch; default
            ``1/sqrt(numel * Qp_i)`` per branch.
        clip: ``(lo, hi)``: quantize ``hardtanh(x, lo, hi)`` instead of x, with hardtanh's gradient, as
            ``fake_quant``'s clip: one pass each way on the C++ CPU kernels, hardtanh then the op elsewhere; the
            same values and gradients either way.

    Gradients flow to x, steps (``p_i * gs_i * sum g dQ_i/ds_i``) and probs (``sum g * Q_i``).
    """
    checks.float_tensor("x", x)
    bits = checks.bit_list("bits", bits)
    signed = checks.flag("signed", signed)
    steps = checks.branch_vector("steps", steps, x, len(bits))
    probs = checks.branch_vector("probs", probs, x, len(bits))
    scales = _branch_grad_scales(grad_scale, bits, signed, x.numel())
    clip = checks.clip(clip)
    if clip is not None:
        if takes_fused_clip(x):
            return _MultiBranchClipped.apply(x, steps, probs, bits, signed, scales, *clip)
        x = torch.nn.functional.hardtanh(x, *clip)
    if torch.compiler.is_compiling():  # one op node with its registered autograd (see fake_quant)
        return torch.ops.lowbit.multi_branch_fake_quant(x, steps, probs, bits, signed, scales)
    return _MultiBranch.apply(x, steps, probs, bits, signed, scales)


class _MultiBranch(torch.autograd.Function):
    """Eager fast path of the op's autograd, as ``_FakeQuant``."""

    @staticmethod
    def forward(ctx, *inputs):
        _multi_branch_setup_context(ctx, inputs, None)
        return (_multi_branch_impl if plain_eager(inputs[0]) else torch.ops.lowbit.multi_branch_fake_quant)(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _multi_branch_grad(ctx, grad)


class _MultiBranchClipped(torch.autograd.Function):
    """``multi_branch_fake_quant(hardtanh(x, lo, hi))`` in one pass each way on the C++ kernels (a ReLU6 folded
    into the MetaMix quantizer that reads it). Plain eager mode only, as ``_FakeQuantClipped``."""

    @staticmethod
    def forward(ctx, x, steps, probs, bits, signed, grad_scale, lo, hi):
        ctx.save_for_backward(x, steps, probs)
        ctx.config = (bits, signed, grad_scale, lo, hi)
        return _multi_branch_impl(x, steps, probs, bits, signed, grad_scale, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        x, steps, probs = ctx.saved_tensors
        dx, dsteps, dprobs = _multi_branch_backward_impl(grad, x, steps, probs, *ctx.config)
        return dx, dsteps, dprobs, None, None, None, None, None
