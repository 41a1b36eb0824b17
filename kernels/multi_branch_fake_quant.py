"""The fused multi-branch quantizer (SPEC section 2) in Triton: one pass forward, one pass backward.

x is a flat run of numel elements and every branch has one step for the whole tensor (per-tensor quantization),
so both passes cut x into 1-D tiles of BLOCK contiguous elements. Each tile is read once and all B branches are
computed from it in registers:

    forward    one tile per program: y = p_0*Q_0 + p_1*Q_1 + ... (in branch order), written once
    backward   a few consecutive tiles per program: dx = g * (p_0*inside_0 + p_1*inside_1 + ...) written once,
               and 2*B float32 partial sums per program (sum g*dQ_i/ds_i and sum g*Q_i), which the launcher
               adds up in float64

The branch count B is a compile-time constant (1..7): the loops over branches are ``tl.static_range`` loops, which
unroll into straight-line code, and the per-branch values travel as tuples of B (the 2*B gradient accumulators
among them, in registers). A branch's step and weight are loaded once per program from the (B,) float32 tensors
(reading them on the host would cost a device sync); its integer range and gradient scale are tuples of plain float
arguments, which Triton never specialises on, so there is one compiled variant per (B, dtype) and not one per set
of bit-widths.

The element math is fake_quant's (``lowbit.kernels.common``), rounding for rounding, and the branches are
combined in the reference's order with every multiply and add rounded on its own, so y and dx match the
reference and the C++ kernels bit for bit. The gradient sums have no atomics (they are deterministic) and no
temporaries of the size of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lowbit.kernels.common import (
    BACKWARD_TILE,
    FORWARD_TILE,
    INT32_LIMIT,
    fake_quant_value,
    lsq_grad_terms,
    num_warps,
    program_index,
    split_backward_work,
    store_rounded,
    sum_partials,
)

from lowbit.core.checks import MAX_BRANCHES


@triton.jit
def _load_per_branch(ptr, B: tl.constexpr):
    """(ptr[0], ..., ptr[B - 1]): one scalar per branch, loaded once per program."""
    values = (tl.load(ptr),)
    for i in tl.static_range(1, B):
        values = values + (tl.load(ptr + i),)
    return values


@triton.jit
def _weighted_branch(x, steps_ptr, probs_ptr, BRANCH: tl.constexpr, qmin, qmax):
    """p * Q(x; s) of branch BRANCH: fake_quant's forward with a zero offset, then the weight, each product rounded."""
    s = tl.load(steps_ptr + BRANCH)
    p = tl.load(probs_ptr + BRANCH)
    return p * fake_quant_value(x, s, 0.0, qmin, qmax)


@triton.jit
def _branch_grads(x, g, s, p, qmin, qmax, coef, acc_step, acc_prob):
    """Adds branch (s, p, qmin, qmax)'s share to dx's coefficient and to its two lane-wise gradient sums."""
    q, inside, dq_dstep = lsq_grad_terms(x, s, 0.0, qmin, qmax)
    coef = coef + tl.where(inside, p, 0.0)
    acc_step += g * dq_dstep
    acc_prob += g * (q * s)
    return coef, acc_step, acc_prob


@triton.jit
def _multi_branch_fwd_kernel(
    # pointers
    x_ptr,
    y_ptr,
    steps_ptr,
    probs_ptr,
    numel,
    # the range of each branch: tuples of B floats
    qmin,
    qmax,
    # meta-parameters
    B: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = program_index(INDEX_64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    # y = p_0*Q_0, then y + p_i*Q_i for i = 1..B-1, in this order (the launch forbids fusing them into FMAs).
    y = _weighted_branch(x, steps_ptr, probs_ptr, 0, qmin[0], qmax[0])
    for i in tl.static_range(1, B):
        y = y + _weighted_branch(x, steps_ptr, probs_ptr, i, qmin[i], qmax[i])
    store_rounded(y_ptr, offs, y, mask)


@triton.jit
def _multi_branch_bwd_kernel(
    # pointers
    grad_ptr,
    x_ptr,
    dx_ptr,
    steps_ptr,
    probs_ptr,
    part_ptr,
    numel,
    # work split: program `prog` takes tiles prog * tiles_per_prog .. + tiles_per_prog - 1
    progs,
    tiles_per_prog,
    # the range and gradient scale of each branch: tuples of B floats
    qmin,
    qmax,
    grad_scale,
    # meta-parameters
    B: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    prog = program_index(INDEX_64)

    # The branch constants, loaded once, and per branch two lane-wise float32 accumulators of the gradient sums,
    # reduced once after the loop. The launcher keeps a program's share to a few thousand elements, so float32
    # error stays orders of magnitude below SPEC's 1e-4. The branch loops unroll at compile time.
    s = _load_per_branch(steps_ptr, B)
    p = _load_per_branch(probs_ptr, B)
    acc_step = (tl.zeros((BLOCK,), dtype=tl.float32),) * B
    acc_prob = (tl.zeros((BLOCK,), dtype=tl.float32),) * B

    for k in range(tiles_per_prog):
        # The last program may run past the final tile; such a tile is fully masked. Masked lanes load x = g = 0
        # (v = 0, q = 0), so they add exact zeros.
        offs = (prog * tiles_per_prog + k) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        # coef = 0 + p_0*inside_0 + p_1*inside_1 + ..., in branch order like the reference.
        coef = tl.zeros((BLOCK,), dtype=tl.float32)
        next_step = ()
        next_prob = ()
        for i in tl.static_range(B):
            coef, a_step, a_prob = _branch_grads(x, g, s[i], p[i], qmin[i], qmax[i], coef, acc_step[i], acc_prob[i])
            next_step = next_step + (a_step,)
            next_prob = next_prob + (a_prob,)
        acc_step = next_step
        acc_prob = next_prob
        # A plain product, as SPEC writes it (an infinite g times a zero coefficient is NaN, as in the reference).
        store_rounded(dx_ptr, offs, g * coef, mask)

    # dL/ds_i = p_i * gs_i * sum(...): the scale is applied to each float32 partial (a relative error of about
    # 1e-7), which leaves the launcher one float64 sum for all 2*B gradients and needs no host data on the device.
    # gs_i travels as a float32 argument, so a scale below float32's normal range (1e-38) would lose precision.
    # Row i of the (2B, progs) partials holds branch i's step sums, row B + i its weight sums.
    for i in tl.static_range(B):
        tl.store(part_ptr + i * progs + prog, tl.sum(acc_step[i], axis=0) * (p[i] * grad_scale[i]))
        tl.store(part_ptr + (B + i) * progs + prog, tl.sum(acc_prob[i], axis=0))


# The tiles are fake_quant's (FORWARD_TILE, BACKWARD_TILE). Compiled for sm_90 by Triton 3.9, the backward (4 warps,
# 8 elements per thread) with B = 3 takes 145 to 150 registers per thread; with B = 7 its 2*B accumulators fill all
# 255 and spill 8 to 16 bytes per thread.


def _branch_args(steps, probs, *per_branch) -> tuple[int, list[tuple[float, ...]]]:
    """B, and each per-branch list (qmin, qmax[, grad_scale]) as a tuple of B floats, the kernels' arguments."""
    count = steps.numel()
    if not 1 <= count <= MAX_BRANCHES:
        raise ValueError(f"the Triton multi-branch kernels take 1..{MAX_BRANCHES} branches, got {count}")
    if probs.numel() != count or any(len(values) != count for values in per_branch):
        raise ValueError("steps, probs, qmin, qmax (and grad_scale) must all have one entry per branch")
    return count, [tuple(float(v) for v in values) for values in per_branch]


def forward(x, steps, probs, qmin: list[int], qmax: list[int]) -> torch.Tensor:
    """y = sum_i probs[i] * Q(x; steps[i], qmin[i], qmax[i]); x contiguous with numel > 0, steps/probs (B,) f32."""
    count, branch_args = _branch_args(steps, probs, qmin, qmax)
    y = torch.empty_like(x)
    numel = x.numel()
    progs = triton.cdiv(numel, FORWARD_TILE)
    _multi_branch_fwd_kernel[(progs,)](
        x,
        y,
        steps,
        probs,
        numel,
        *branch_args,
        B=count,
        # Offsets run up to progs * tile, past numel in the last tile.
        INDEX_64=progs * FORWARD_TILE >= INT32_LIMIT,
        BLOCK=FORWARD_TILE,
        num_warps=num_warps(FORWARD_TILE),
        # The reference rounds every product and sum; a fused multiply-add would round once and change y's bits.
        enable_fp_fusion=False,
    )
    return y


def backward(grad, x, steps, probs, qmin: list[int], qmax: list[int], grad_scale: list[float]):
    """(dx, dsteps, dprobs); dsteps[i] = probs[i] * grad_scale[i] * sum(g * dQ_i/ds_i), dprobs[i] = sum(g * Q_i)."""
    count, branch_args = _branch_args(steps, probs, qmin, qmax, grad_scale)
    dx = torch.empty_like(x)
    numel = x.numel()
    tiles_per_prog, progs = split_backward_work(triton.cdiv(numel, BACKWARD_TILE), 1, BACKWARD_TILE)
    # Row i holds branch i's step partials, row B + i its weight partials; every slot is written exactly once.
    partials = torch.empty((2 * count, progs), dtype=torch.float32, device=x.device)

    _multi_branch_bwd_kernel[(progs,)](
        grad,
        x,
        dx,
        steps,
        probs,
        partials,
        numel,
        progs,
        tiles_per_prog,
        *branch_args,
        B=count,
        # Offsets run up to progs * tiles_per_prog * tile, past numel in the last program.
        INDEX_64=progs * tiles_per_prog * BACKWARD_TILE >= INT32_LIMIT,
        BLOCK=BACKWARD_TILE,
        num_warps=num_warps(BACKWARD_TILE),
        # Same element math as the forward, and dx's coefficient summed like the reference's.
        enable_fp_fusion=False,
    )
    sums = sum_partials(partials)
    return dx, sums[:count].to(torch.float32), sums[count:].to(torch.float32)
