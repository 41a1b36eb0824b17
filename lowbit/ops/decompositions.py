"""The lowbit ops as plain aten ops, for ``torch.compile`` with Inductor (see docs/compile.md).

In eager mode the ops run the fused kernels of a backend. Under ``torch.compile(backend="inductor")`` an opaque
custom op is a wall: Inductor cannot fuse the batch-norm, ReLU or residual add before it, nor the ReLU/BN
backward after its backward, so every quantizer costs extra passes over memory and layout copies. The functions
here restate each op (forward and backward) in aten ops with the fused kernels' exact arithmetic, and
``register_inductor_decompositions`` puts them (all but the multi-branch backward by default: see below) in
Inductor's decomposition table, so Inductor inlines them and fuses them with their neighbours. Other compile
backends (``aot_eager``, ``torch.export``) keep the custom ops.

Numerics (SPEC sections 1 and 2) are those of the C++ kernels, operation by operation:
``v = (x - beta) / s`` (true division; beta = 0 without offset), ``q = clamp(round(v), Qn, Qp)`` (half to even),
``y = q * s + beta`` (two roundings; Inductor's C++ backend compiles with ``-ffp-contract=off``), multi-branch
terms ``p_i * Q_i`` summed in branch order; with ``abs_step`` the step is ``|step|`` and its gradient is multiplied
by ``sign(step)``, as the eager launcher does. So the compiled forward equals the eager one bit for bit. The
step/offset/prob gradients are the same formulas, each product rounded to float32 and summed in float64 (the
reduction order differs from the kernels', which SPEC leaves free).

Per-channel quantizers (conv and linear weights) stay the fused kernels (``stays_fused``): their input is a
parameter and their output feeds a convolution or matmul, so there is nothing for Inductor to fuse them with,
and generating their code only added compile time (ResNet-18 W4A4 training graph: 56 -> 47 s on 2 cores, the
same step time; docs/compile.md). Inductor calls the custom op for them.

The multi-branch op's backward stays the fused kernel too, by default: its decomposition (two float64
gradient reductions per branch) made Inductor's code, and so the compile time, much larger and the compiled
step slower (MobileNet-v2 3-branch: compile 2.24x fp32's decomposed vs 1.41x fused, step 1.28x vs 1.23x;
bench/results/backward_modes_cpu.md). The single-branch backward is decomposed by default: there it fuses with
the ReLU and batch-norm backward, and the compiled step was faster for it (W4A4: 1.01x vs 1.12x fp32's), at a
longer compile (1.36x vs 1.13x), which a training run of more than a few hundred steps pays back.
``use_inductor_decompositions(True, backward=True / False)`` decomposes every backward op / none of them.

Value checks: the step (> 0, finite), offset and probs (finite) are checked inside the compiled graph with
``torch._assert_async`` on those small tensors: on CPU a failure raises ``RuntimeError`` from the compiled
kernel (eager mode raises ``ValueError``); on CUDA it is a device-side assert, with no host sync.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def _range(bits: int, signed: bool) -> tuple[int, int]:
    from lowbit.ops import quant_range

    return quant_range(bits, signed)


def _channel_shape(x: Tensor, channels: int, axis: int) -> list[int]:
    """The shape that broadcasts a (C,) parameter along ``axis`` of x (all ones for a per-tensor parameter)."""
    shape = [1] * x.dim()
    if channels > 1:
        shape[axis] = channels
    return shape


def _assert_valid(step: Tensor, name: str, positive: bool) -> None:
    ok = torch.isfinite(step) & (step > 0) if positive else torch.isfinite(step)
    what = "positive and finite" if positive else "finite"
    torch._assert_async(ok.all(), f"lowbit: {name} must be {what}")


def _reduced_dims(x: Tensor, channels: int, axis: int) -> list[int]:
    return [d for d in range(x.dim()) if channels == 1 or d != axis]


def _channel_sum(t: Tensor, x: Tensor, channels: int, axis: int) -> Tensor:
    """Sum of the float32 terms ``t`` per channel, accumulated in float64, as a (C,) float64 tensor."""
    dims = _reduced_dims(x, channels, axis)
    total = t.sum(dim=dims, dtype=torch.float64) if dims else t.double()
    return total.reshape(channels)


def stays_fused(step: Tensor) -> bool:
    """Whether Inductor keeps this ``fake_quant`` call as the custom op: per-channel steps (weights)."""
    return step.numel() > 1


def fake_quant(
    x: Tensor,
    step: Tensor,
    offset: Tensor | None,
    bits: int,
    signed: bool,
    axis: int,
    grad_scale,
    abs_step: bool = False,
):
    """``lowbit::fake_quant`` (SPEC section 1) in aten ops."""
    if stays_fused(step):
        return NotImplemented  # the op stays in the graph; Inductor calls it (fallback registered below)
    qmin, qmax = _range(bits, signed)
    step = step.abs() if abs_step else step
    _assert_valid(step, "step", positive=True)
    shape = _channel_shape(x, step.numel(), axis)
    s = step.reshape(shape)
    beta = offset.reshape(shape) if offset is not None else 0.0
    if offset is not None:
        _assert_valid(offset, "offset", positive=False)
    v = (x.float() - beta) / s
    return (torch.clamp(torch.round(v), qmin, qmax) * s + beta).to(x.dtype)


def fake_quant_backward(
    grad, x, step, offset, bits: int, signed: bool, axis: int, grad_scale: float, abs_step: bool = False
):
    """``lowbit::fake_quant_backward``: (dL/dx, dL/ds, dL/dbeta) of SPEC section 1 in aten ops."""
    if stays_fused(step):
        return NotImplemented
    qmin, qmax = _range(bits, signed)
    channels = step.numel()
    shape = _channel_shape(x, channels, axis)
    s = (step.abs() if abs_step else step).reshape(shape)
    beta = offset.reshape(shape) if offset is not None else 0.0
    g = grad.float()
    v = (x.float() - beta) / s
    inside = (v >= qmin) & (v <= qmax)
    beyond = torch.where(v < qmin, float(qmin), float(qmax))
    dq_ds = torch.where(inside, torch.round(v) - v, beyond)
    dx = torch.where(inside, g, 0.0).to(x.dtype)
    dstep = (_channel_sum(g * dq_ds, x, channels, axis) * grad_scale).to(step.dtype)
    dstep = dstep * step.sign() if abs_step else dstep
    doffset = (_channel_sum(torch.where(inside, 0.0, g), x, channels, axis) * grad_scale).to(step.dtype)
    return dx, dstep, doffset


def _branch(xf: Tensor, step: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """(v, q) of one branch: the C++ kernels divide ``x - 0`` by the step."""
    v = (xf - 0.0) / step
    return v, torch.clamp(torch.round(v), qmin, qmax)


def multi_branch_fake_quant(x: Tensor, steps: Tensor, probs: Tensor, bits: list[int], signed: bool, grad_scale):
    """``lowbit::multi_branch_fake_quant`` (SPEC section 2) in aten ops: ``sum_i p_i * Q_i`` in branch order."""
    _assert_valid(steps, "steps", positive=True)
    _assert_valid(probs, "probs", positive=False)
    xf = x.float()
    y = None
    for i, b in enumerate(bits):
        qmin, qmax = _range(b, signed)
        term = probs[i] * (_branch(xf, steps[i], qmin, qmax)[1] * steps[i] + 0.0)
        y = term if y is None else y + term
    return y.to(x.dtype)


def multi_branch_fake_quant_backward(grad, x, steps, probs, bits: list[int], signed: bool, grad_scale: list[float]):
    """``lowbit::multi_branch_fake_quant_backward``: (dL/dx, dL/ds_i, dL/dp_i) of SPEC section 2 in aten ops."""
    xf, g = x.float(), grad.float()
    coef = torch.zeros((), dtype=torch.float32, device=x.device)
    dsteps, dprobs = [], []
    for i, b in enumerate(bits):
        qmin, qmax = _range(b, signed)
        s, p = steps[i], probs[i]
        v, q = _branch(xf, s, qmin, qmax)
        inside = (v >= qmin) & (v <= qmax)
        dq_ds = torch.where(inside, torch.round(v) - v, torch.where(v < qmin, float(qmin), float(qmax)))
        coef = coef + torch.where(inside, p, 0.0)
        dsteps.append(_total(g * dq_ds) * p.double() * grad_scale[i])
        dprobs.append(_total(g * (q * s)))
    dx = (g * coef).to(x.dtype)
    return dx, torch.stack(dsteps).to(steps.dtype), torch.stack(dprobs).to(probs.dtype)


def _total(t: Tensor) -> Tensor:
    return t.sum(dtype=torch.float64)


_state = {"registered": False, "enabled": True, "backward": None}


def _table() -> dict:
    """Each lowbit op with its decomposition, whether that is a backward op, and whether it is decomposed by
    default (see the module docstring)."""
    ops = torch.ops.lowbit
    return {
        ops.fake_quant.default: (fake_quant, False, True),
        ops.fake_quant_backward.default: (fake_quant_backward, True, True),
        ops.multi_branch_fake_quant.default: (multi_branch_fake_quant, False, True),
        ops.multi_branch_fake_quant_backward.default: (multi_branch_fake_quant_backward, True, False),
    }


def _update_inductor_table(add: bool, backward: bool | None) -> None:
    from torch._inductor import decomposition as inductor_decomp
    from torch._inductor import lowering

    for op, (fn, is_backward, by_default) in _table().items():
        if add and op not in lowering.lowerings:
            # The call Inductor makes for an op that stays a custom op (stays_fused, or a backward op left out
            # of the table). It is what Inductor generates for any op without a decomposition; registering it
            # up front covers the ops whose decomposition returns NotImplemented.
            lowering.make_fallback(op, warn=False, override_decomp=True)
        decompose = by_default if backward is None or not is_backward else backward
        if add and decompose:
            inductor_decomp.decompositions[op] = fn
        else:
            inductor_decomp.decompositions.pop(op, None)
    # select_decomp_table() serves a cached copy of the table; drop it so the next compile sees the change.
    inductor_decomp.fast_random_decomps.cache_clear()


def register_inductor_decompositions() -> None:
    """Puts the functions above into Inductor's decomposition table, all but the multi-branch backward unless
    asked otherwise (once per process, unless turned off).

    Called from the ops' fake kernels, i.e. when a graph holding a lowbit op is first traced, so that importing
    lowbit does not import Inductor. The table is read when Inductor compiles a graph, after that tracing.
    """
    if _state["registered"] or not _state["enabled"]:
        return
    _update_inductor_table(add=True, backward=_state["backward"])
    _state["registered"] = True


def use_inductor_decompositions(enabled: bool, *, backward: bool | None = None) -> None:
    """For graphs compiled afterwards: ``enabled=False`` turns the decompositions off (Inductor then calls the
    fused kernels as opaque custom ops); ``enabled=True`` puts them back, the backward ops as ``backward`` says:
    None, the default (the single-branch backward decomposed, the multi-branch one fused), True (every backward
    op decomposed) or False (every backward op fused). For comparisons and debugging (docs/compile.md).
    Inductor's on-disk caches do not key on the decomposition table: compare with a fresh
    ``TORCHINDUCTOR_CACHE_DIR`` (as bench/profile_compile.py does), or a cached graph of the other mode is
    served."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if backward is not None and not isinstance(backward, bool):
        raise TypeError(f"backward must be None or a bool, got {type(backward).__name__}")
    if backward is not None and not enabled:
        raise ValueError("backward picks which backward ops are decomposed: it needs enabled=True")
    _state.update(enabled=enabled, registered=enabled, backward=backward)
    _update_inductor_table(add=enabled, backward=backward)
