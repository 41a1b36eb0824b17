"""``lowbit.fake_quant``: the fused LSQ / LSQ+ fake quantizer (SPEC section 1) as the custom op ``lowbit::fake_quant``.

The public function checks its arguments (SPEC section 6); the op picks a backend per call (``lowbit.backends.select``)
and runs its kernel, ``select(x.device).kernels.fake_quant_forward``, which checks the values of step and offset
(``csrc/cpu/fake_quant.cpp``, ``csrc/cuda/fake_quant.cu``, ``lowbit/backends/{reference,triton}.py``). The op has a
fake kernel for tracing and an autograd formula whose backward is a custom op of its own. Inductor replaces
both by their aten decompositions (``lowbit.ops.decompositions``) so they fuse with their neighbours.
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
    inner_size,
    memory_order,
    plain_eager,
    takes_fused_clip,
)

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------------
# fake_quant: the fused LSQ / LSQ+ quantizer (SPEC section 1)
# ---------------------------------------------------------------------------------------------------------------


def _fake_quant_impl(x, step, offset, bits, signed, axis, grad_scale, abs_step=False, lo=-math.inf, hi=math.inf):
    if x.numel() == 0:
        return torch.empty_like(x)
    step = step.abs() if abs_step else step
    kernels = select(x.device).kernels
    qmin, qmax = quant_range(bits, signed)
    offset = None if offset is None else offset.contiguous()
    order = memory_order(x)
    xm = in_memory_order(x, order)
    axis = axis if order is None else order.index(axis)
    inner = inner_size(xm, step.numel(), axis)
    y = kernels.fake_quant_forward(xm, step.contiguous(), offset, qmin, qmax, inner, **clip_arguments(lo, hi))
    return in_logical_order(y, order)


def _fake_quant_backward_impl(
    grad, x, step, offset, bits, signed, axis, grad_scale, abs_step=False, lo=-math.inf, hi=math.inf
):
    if x.numel() == 0:
        return torch.empty_like(x), torch.zeros_like(step), torch.zeros_like(step)
    dx, dstep, doffset = _launch_fake_quant_backward(
        grad, x, step.abs() if abs_step else step, offset, bits, signed, axis, grad_scale, lo, hi
    )
    return dx, (dstep * step.sign() if abs_step else dstep), doffset


def _launch_fake_quant_backward(grad, x, step, offset, bits, signed, axis, grad_scale, lo, hi):
    qmin, qmax = quant_range(bits, signed)
    kernels = select(x.device).kernels
    order = memory_order(x)
    xm, gm = in_memory_order(x, order), in_memory_order(grad, order)
    axis = axis if order is None else order.index(axis)
    inner = inner_size(xm, step.numel(), axis)
    offset = None if offset is None else offset.contiguous()
    dx, dstep, doffset = kernels.fake_quant_backward(
        gm, xm, step.contiguous(), offset, qmin, qmax, inner, grad_scale, **clip_arguments(lo, hi)
    )
    return in_logical_order(dx, order), dstep, doffset


# abs_step: the op quantizes with |step| and hands back dL/dstep = sign(step) * dL/d|step|: a learned step that an
# optimizer step pushed below zero keeps working (LSQQuantizer). Inside the op rather than as an aten abs/sign
# around it, because Inductor keeps a per-channel (weight) call opaque and would otherwise put that lone abs into
# the generated kernel before the call, so that the otherwise identical kernels of identical layers differ and
# each is compiled (docs/decisions.md, issue 16).
define(
    "fake_quant(Tensor x, Tensor step, Tensor? offset, int bits, bool signed, int axis, float grad_scale, "
    "bool abs_step=False) -> Tensor",
    _fake_quant_impl,
    lambda x, step, offset, bits, signed, axis, grad_scale, abs_step=False: torch.empty_like(x),
)
define(
    "fake_quant_backward(Tensor grad, Tensor x, Tensor step, Tensor? offset, int bits, bool signed, int axis, "
    "float grad_scale, bool abs_step=False) -> (Tensor, Tensor, Tensor)",
    _fake_quant_backward_impl,
    lambda grad, x, step, offset, bits, signed, axis, grad_scale, abs_step=False: (
        torch.empty_like(x),
        torch.empty_like(step),
        torch.empty_like(step),
    ),
)


def _fake_quant_setup_context(ctx, inputs, output):
    x, step, offset, bits, signed, axis, grad_scale, *abs_step = inputs
    ctx.save_for_backward(x, step, offset)
    ctx.config = (bits, signed, axis, grad_scale, *abs_step)


def _fake_quant_grad(ctx, grad):
    x, step, offset = ctx.saved_tensors
    backward = _fake_quant_backward_impl if plain_eager(grad) else torch.ops.lowbit.fake_quant_backward
    dx, dstep, doffset = backward(grad, x, step, offset, *ctx.config)
    nones = (None,) * len(ctx.config)  # bits, signed, axis, grad_scale and abs_step when given
    return dx, dstep, (doffset if offset is not None else None), *nones


torch.library.register_autograd(
    "lowbit::fake_quant", _fake_quant_grad, setup_context=_fake_quant_setup_context, lib=LIB
)


class _FakeQuant(torch.autograd.Function):
    """The public op's autograd: the same forward and backward ops as the registration above, through a plain
    autograd.Function, whose eager overhead is about a third of register_autograd's (it counts on the many small
    tensors of a network); in plain eager mode it calls the kernels directly (``plain_eager``). torch.compile
    traces it into the same two custom-op nodes."""

    @staticmethod
    def forward(ctx, *inputs):
        _fake_quant_setup_context(ctx, inputs, None)
        return (_fake_quant_impl if plain_eager(inputs[0]) else torch.ops.lowbit.fake_quant)(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _fake_quant_grad(ctx, grad)


class _FakeQuantClipped(torch.autograd.Function):
    """``fake_quant(hardtanh(x, lo, hi))`` in one pass each way: the C++ kernels take the clip (a ReLU6 folded
    into the quantizer that reads it). Plain eager mode only (``fake_quant`` composes hardtanh otherwise)."""

    @staticmethod
    def forward(ctx, x, step, offset, bits, signed, axis, grad_scale, abs_step, lo, hi):
        ctx.save_for_backward(x, step, offset)
        ctx.config = (bits, signed, axis, grad_scale, abs_step, lo, hi)
        return _fake_quant_impl(x, step, offset, bits, signed, axis, grad_scale, abs_step, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        x, step, offset = ctx.saved_tensors
        dx, dstep, doffset = _fake_quant_backward_impl(grad, x, step, offset, *ctx.config)
        return dx, dstep, (doffset if offset is not None else None), None, None, None, None, None, None, None


def _channel_params(x: Tensor, step: Tensor, offset: Tensor | None, axis) -> tuple[Tensor, Tensor | None, int]:
    """Checks step/offset/axis against x; returns float32 (C,) step and offset and a non-negative axis.

    C is 1 for per-tensor quantization. With ``axis=None`` a step of more than one element means per-channel
    along axis 0 (SPEC section 1), as for conv and linear weights.
    """
    checks.float_tensor("step", step)
    checks.same_device("step", step, x)
    if axis is None:
        axis = 0 if step.numel() > 1 else None
    if axis is not None:
        axis = checks.axis(axis, x.dim())
    channels = x.shape[axis] if axis is not None else 1
    if step.numel() not in (1, channels):
        where = f"x.shape[{axis}]={channels} elements (per-channel along axis {axis})" if axis is not None else ""
        raise ValueError(
            f"step must have 1 element (per-tensor){' or ' + where if where else ''}, got shape {tuple(step.shape)}"
        )
    if step.numel() == 1 and channels != 1:
        axis = None  # a single step is per-tensor, whatever the axis
    step = step.reshape(-1).float()
    if offset is not None:
        checks.float_tensor("offset", offset)
        checks.same_device("offset", offset, x)
        if offset.numel() not in (1, step.numel()):
            raise ValueError(
                f"offset must have 1 element or as many as step ({step.numel()}), got shape {tuple(offset.shape)}"
            )
        offset = offset.reshape(-1).float().expand(step.numel()).contiguous()
    return step, offset, (axis if axis is not None else 0)


def fake_quant(
    x: Tensor,
    step: Tensor,
    bits: int,
    *,
    signed: bool = False,
    offset: Tensor | None = None,
    axis: int | None = None,
    grad_scale: float | None = None,
    clip: tuple[float, float] | None = None,
    abs_step: bool = False,
) -> Tensor:
    """LSQ fake quantization ``y = clamp(round((x - offset) / step), Qn, Qp) * step + offset`` (SPEC section 1).

    Args:
        x: float32, float16 or bfloat16 tensor of any shape.
        step: positive step size (any nonzero one with ``abs_step``): 1 element (per-tensor) or
            ``x.shape[axis]`` elements (per-channel).
        bits: bit-width, 2..8.
        signed: signed range ``[-2^(b-1), 2^(b-1)-1]`` instead of ``[0, 2^b-1]``.
        offset: optional LSQ+ offset, 1 element or one per channel.
        axis: channel axis for a per-channel step (default 0 when step has more than one element).
        grad_scale: LSQ gradient scale for step and offset; default ``1/sqrt(n * Qp)``, n = elements per step.
        clip: ``(lo, hi)``: quantize ``hardtanh(x, lo, hi)`` instead of x, with hardtanh's gradient (zero
            outside the open interval). A ReLU6 (0, 6) or ReLU (0, inf) folded into the quantizer that reads it
            (``lowbit.fold_activation_clips``): one pass each way instead of two on the C++ CPU kernels; the other
            backends, and torch.compile (which fuses it anyway), apply the hardtanh first. The same values either way.
        abs_step: quantize with ``|step|`` (the offset keeps its sign) and give step the gradient
            ``sign(step) * dL/d|step|``: for a learned step, which an optimizer step may push below zero
            (``LSQQuantizer``). The same values and gradients as passing ``step.abs()``, in one op.

    Returns ``y`` in x's dtype. Gradients flow to x (straight-through inside the range), step and offset.
    """
    checks.float_tensor("x", x)
    bits = checks.bits("bits", bits)
    signed = checks.flag("signed", signed)
    abs_step = checks.flag("abs_step", abs_step)
    grad_scale = checks.grad_scale(grad_scale)
    clip = checks.clip(clip)
    step, offset, axis = _channel_params(x, step, offset, axis)
    if grad_scale is None:
        per_step = x.numel() // max(step.numel(), 1)
        grad_scale = 1.0 / math.sqrt(per_step * quant_range(bits, signed)[1]) if per_step else 1.0
    if clip is not None:
        if takes_fused_clip(x):
            return _FakeQuantClipped.apply(x, step, offset, bits, signed, axis, grad_scale, abs_step, *clip)
        x = torch.nn.functional.hardtanh(x, *clip)
    if torch.compiler.is_compiling():  # one op node with its registered autograd: Dynamo need not trace _FakeQuant
        return torch.ops.lowbit.fake_quant(x, step, offset, bits, signed, axis, grad_scale, abs_step)
    return _FakeQuant.apply(x, step, offset, bits, signed, axis, grad_scale, abs_step)
