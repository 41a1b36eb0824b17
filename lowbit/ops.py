"""Public ops and their ``torch.library`` definitions.

Each op is defined once here: a public Python function that checks its arguments (SPEC section 6), a custom op
``lowbit::<name>`` whose implementation picks a backend per call (``lowbit.backends.select``), a fake kernel for
tracing, and autograd wiring whose backward is a custom op of its own. Dynamo records the custom ops as single
nodes; Inductor then replaces them by their aten decompositions (``lowbit.decompositions``, same numerics) and
fuses those with the neighbouring ops, while other compile backends run the nodes (backend chosen at run time).

The ops are declared with ``torch.library.Library`` (schema string + per-device Python kernels) rather than the
``torch.library.custom_op`` decorator: same registrations (fake, autograd), about half the per-call overhead,
which matters for the many small tensors of a real network.
"""

from __future__ import annotations

import math

import torch

from lowbit import _checks
from lowbit.backends import select
from lowbit.decompositions import register_inductor_decompositions

Tensor = torch.Tensor


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of SPEC section 1."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


_LIB = torch.library.Library("lowbit", "DEF")  # noqa: TOR901  (kept alive for the life of the process)


def _define(schema: str, impl, fake):
    """Declares ``lowbit::<schema>`` with ``impl`` for CPU and CUDA tensors and ``fake`` for tracing."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    torch.library.register_fake(f"lowbit::{name}", _tracing(fake), lib=_LIB)
    return name


def _tracing(fake):
    """The fake kernel, which runs whenever a graph holding the op is traced: it also hands Inductor the op's
    aten decomposition (lowbit.decompositions), so a compiled graph fuses the op with its neighbours."""

    def run(*args):
        register_inductor_decompositions()
        return fake(*args)

    return run


def _values_checked_by(backend) -> bool:
    """Backends whose kernels validate step/offset values themselves (cheaply, without a device sync)."""
    return getattr(backend, "CHECKS_VALUES", False)


def _memory_order(x: Tensor) -> list[int] | None:
    """The dims of x from outermost to innermost in memory when x is a permuted dense tensor (channels-last, a
    transpose), so the kernels can run on ``x.permute(order)`` without a copy; None when x is contiguous."""
    if x.is_contiguous():
        return None
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return order if x.permute(order).is_contiguous() else None


def _in_memory_order(t: Tensor, order: list[int] | None) -> Tensor:
    return t.contiguous() if order is None else t.permute(order).contiguous()  # no copy when t is laid out so


def _in_logical_order(t: Tensor, order: list[int] | None) -> Tensor:
    return t if order is None else t.permute(sorted(range(len(order)), key=order.__getitem__))


def _inner_size(x: Tensor, channels: int, axis: int) -> int:
    """Elements after ``axis`` in x: the stride of the channel index when x is viewed as (outer, C, inner)."""
    return math.prod(x.shape[axis + 1 :]) if channels > 1 else 1


# ---------------------------------------------------------------------------------------------------------------
# fake_quant: the fused LSQ / LSQ+ quantizer (SPEC section 1)
# ---------------------------------------------------------------------------------------------------------------


def _fake_quant_impl(x, step, offset, bits, signed, axis, grad_scale):
    if x.numel() == 0:
        return torch.empty_like(x)
    backend = select(x.device)
    if not _values_checked_by(backend):
        _checks.step_values("step", step)
        if offset is not None:
            _checks.finite_values("offset", offset)
    qmin, qmax = quant_range(bits, signed)
    offset = None if offset is None else offset.contiguous()
    order = _memory_order(x)
    xm = _in_memory_order(x, order)
    axis = axis if order is None else order.index(axis)
    inner = _inner_size(xm, step.numel(), axis)
    return _in_logical_order(backend.fake_quant_forward(xm, step.contiguous(), offset, qmin, qmax, inner), order)


def _fake_quant_backward_impl(grad, x, step, offset, bits, signed, axis, grad_scale):
    if x.numel() == 0:
        return torch.empty_like(x), torch.zeros_like(step), torch.zeros_like(step)
    qmin, qmax = quant_range(bits, signed)
    backend = select(x.device)
    order = _memory_order(x)
    xm, gm = _in_memory_order(x, order), _in_memory_order(grad, order)
    axis = axis if order is None else order.index(axis)
    inner = _inner_size(xm, step.numel(), axis)
    offset = None if offset is None else offset.contiguous()
    dx, dstep, doffset = backend.fake_quant_backward(gm, xm, step.contiguous(), offset, qmin, qmax, inner, grad_scale)
    return _in_logical_order(dx, order), dstep, doffset


_define(
    "fake_quant(Tensor x, Tensor step, Tensor? offset, int bits, bool signed, int axis, float grad_scale) -> Tensor",
    _fake_quant_impl,
    lambda x, step, offset, bits, signed, axis, grad_scale: torch.empty_like(x),
)
_define(
    "fake_quant_backward(Tensor grad, Tensor x, Tensor step, Tensor? offset, int bits, bool signed, int axis, "
    "float grad_scale) -> (Tensor, Tensor, Tensor)",
    _fake_quant_backward_impl,
    lambda grad, x, step, offset, bits, signed, axis, grad_scale: (
        torch.empty_like(x),
        torch.empty_like(step),
        torch.empty_like(step),
    ),
)


def _fake_quant_setup_context(ctx, inputs, output):
    x, step, offset, bits, signed, axis, grad_scale = inputs
    ctx.save_for_backward(x, step, offset)
    ctx.config = (bits, signed, axis, grad_scale)


def _fake_quant_grad(ctx, grad):
    x, step, offset = ctx.saved_tensors
    dx, dstep, doffset = torch.ops.lowbit.fake_quant_backward(grad, x, step, offset, *ctx.config)
    return dx, dstep, (doffset if offset is not None else None), None, None, None, None


torch.library.register_autograd(
    "lowbit::fake_quant", _fake_quant_grad, setup_context=_fake_quant_setup_context, lib=_LIB
)


class _FakeQuant(torch.autograd.Function):
    """The public op's autograd: the same forward and backward ops as the registration above, through a plain
    autograd.Function, whose eager overhead is about a third of register_autograd's (it counts on the many small
    tensors of a network). torch.compile traces it into the same two custom-op nodes."""

    @staticmethod
    def forward(ctx, *inputs):
        _fake_quant_setup_context(ctx, inputs, None)
        return torch.ops.lowbit.fake_quant(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _fake_quant_grad(ctx, grad)


def _channel_params(x: Tensor, step: Tensor, offset: Tensor | None, axis) -> tuple[Tensor, Tensor | None, int]:
    """Checks step/offset/axis against x; returns float32 (C,) step and offset and a non-negative axis.

    C is 1 for per-tensor quantization. With ``axis=None`` a step of more than one element means per-channel
    along axis 0 (SPEC section 1), as for conv and linear weights.
    """
    _checks.float_tensor("step", step)
    _checks.same_device("step", step, x)
    if axis is None:
        axis = 0 if step.numel() > 1 else None
    if axis is not None:
        axis = _checks.axis(axis, x.dim())
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
        _checks.float_tensor("offset", offset)
        _checks.same_device("offset", offset, x)
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
) -> Tensor:
    """LSQ fake quantization ``y = clamp(round((x - offset) / step), Qn, Qp) * step + offset`` (SPEC section 1).

    Args:
        x: float32, float16 or bfloat16 tensor of any shape.
        step: positive step size: 1 element (per-tensor) or ``x.shape[axis]`` elements (per-channel).
        bits: bit-width, 2..8.
        signed: signed range ``[-2^(b-1), 2^(b-1)-1]`` instead of ``[0, 2^b-1]``.
        offset: optional LSQ+ offset, 1 element or one per channel.
        axis: channel axis for a per-channel step (default 0 when step has more than one element).
        grad_scale: LSQ gradient scale for step and offset; default ``1/sqrt(n * Qp)``, n = elements per step.

    Returns ``y`` in x's dtype. Gradients flow to x (straight-through inside the range), step and offset.
    """
    _checks.float_tensor("x", x)
    bits = _checks.bits("bits", bits)
    signed = _checks.flag("signed", signed)
    grad_scale = _checks.grad_scale(grad_scale)
    step, offset, axis = _channel_params(x, step, offset, axis)
    if grad_scale is None:
        per_step = x.numel() // max(step.numel(), 1)
        grad_scale = 1.0 / math.sqrt(per_step * quant_range(bits, signed)[1]) if per_step else 1.0
    return _FakeQuant.apply(x, step, offset, bits, signed, axis, grad_scale)


# ---------------------------------------------------------------------------------------------------------------
# multi_branch_fake_quant: MetaMix's mixture of bit-widths of one activation (SPEC section 2)
# ---------------------------------------------------------------------------------------------------------------


def _branch_ranges(bits: list[int], signed: bool) -> tuple[list[int], list[int]]:
    ranges = [quant_range(b, signed) for b in bits]
    return [lo for lo, _ in ranges], [hi for _, hi in ranges]


def _multi_branch_impl(x, steps, probs, bits, signed, grad_scale):
    if x.numel() == 0:
        return torch.empty_like(x)
    backend = select(x.device)
    if not _values_checked_by(backend):
        _checks.step_values("steps", steps)
        _checks.finite_values("probs", probs)
    qmin, qmax = _branch_ranges(bits, signed)
    order = _memory_order(x)
    y = backend.multi_branch_forward(_in_memory_order(x, order), steps.contiguous(), probs.contiguous(), qmin, qmax)
    return _in_logical_order(y, order)


def _multi_branch_backward_impl(grad, x, steps, probs, bits, signed, grad_scale):
    if x.numel() == 0:
        return torch.empty_like(x), torch.zeros_like(steps), torch.zeros_like(probs)
    qmin, qmax = _branch_ranges(bits, signed)
    order = _memory_order(x)
    dx, dsteps, dprobs = select(x.device).multi_branch_backward(
        _in_memory_order(grad, order),
        _in_memory_order(x, order),
        steps.contiguous(),
        probs.contiguous(),
        qmin,
        qmax,
        grad_scale,
    )
    return _in_logical_order(dx, order), dsteps, dprobs


_define(
    "multi_branch_fake_quant(Tensor x, Tensor steps, Tensor probs, int[] bits, bool signed, float[] grad_scale) "
    "-> Tensor",
    _multi_branch_impl,
    lambda x, steps, probs, bits, signed, grad_scale: torch.empty_like(x),
)
_define(
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
    dx, dsteps, dprobs = torch.ops.lowbit.multi_branch_fake_quant_backward(grad, x, steps, probs, *ctx.config)
    return dx, dsteps, dprobs, None, None, None


torch.library.register_autograd(
    "lowbit::multi_branch_fake_quant", _multi_branch_grad, setup_context=_multi_branch_setup_context, lib=_LIB
)


def _branch_grad_scales(grad_scale, bits: list[int], signed: bool, per_step: int) -> list[float]:
    if grad_scale is None or isinstance(grad_scale, (int, float)):
        gs = _checks.grad_scale(grad_scale)
        if gs is not None:
            return [gs] * len(bits)
        return [1.0 / math.sqrt(per_step * quant_range(b, signed)[1]) if per_step else 1.0 for b in bits]
    scales = [_checks.grad_scale(g) for g in grad_scale]
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

    Gradients flow to x, steps (``p_i * gs_i * sum g dQ_i/ds_i``) and probs (``sum g * Q_i``).
    """
    _checks.float_tensor("x", x)
    bits = _checks.bit_list("bits", bits)
    signed = _checks.flag("signed", signed)
    steps = _checks.branch_vector("steps", steps, x, len(bits))
    probs = _checks.branch_vector("probs", probs, x, len(bits))
    scales = _branch_grad_scales(grad_scale, bits, signed, x.numel())
    return _MultiBranch.apply(x, steps, probs, bits, signed, scales)


class _MultiBranch(torch.autograd.Function):
    """Eager fast path of the op's autograd, as ``_FakeQuant``."""

    @staticmethod
    def forward(ctx, *inputs):
        _multi_branch_setup_context(ctx, inputs, None)
        return torch.ops.lowbit.multi_branch_fake_quant(*inputs)

    @staticmethod
    def backward(ctx, grad):
        return _multi_branch_grad(ctx, grad)
