"""The fused multi-branch quantizer (SPEC section 2) in Triton: one pass forward, one pass backward.

x is a flat run of numel elements and every branch has one step for the whole tensor (per-tensor quantization),
so both passes cut x into 1-D tiles of BLOCK contiguous elements. Each tile is read once and all B branches are
computed from it in registers:

    forward    one tile per program: y = p_0*Q_0 + p_1*Q_1 + ... (in branch order), written once
    backward   a few consecutive tiles per program: dx = g * (p_0*inside_0 + p_1*inside_1 + ...) written once,
               and 2*B float32 partial sums per program (sum g*dQ_i/ds_i and sum g*Q_i), which the launcher
               adds up in float64

The branch count B is a compile-time constant (1..7), so the per-branch work unrolls into straight-line code with
the 2*B gradient accumulators in registers. A branch's step and weight are loaded once per program from the (B,)
float32 tensors (reading them on the host would cost a device sync); its integer range and gradient scale are
plain float arguments, which Triton never specialises on, so there is one compiled variant per (B, dtype) and
not one per set of bit-widths.

The element math is fake_quant's (``lowbit.kernels.fake_quant``), rounding for rounding, and the branches are
combined in the reference's order with every multiply and add rounded on its own, so y and dx match the
reference and the C++ kernels bit for bit. The gradient sums have no atomics (they are deterministic) and no
temporaries of the size of x.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lowbit.kernels.fake_quant import (
    _INT32_LIMIT,
    _MAX_PARTIAL_TERMS,
    _MIN_PROGRAMS,
    _num_warps,
    _round_clamped,
    _store_rounded,
)

MAX_BRANCHES = 7


@triton.jit
def _branch_init(steps_ptr, probs_ptr, BRANCH: tl.constexpr, BLOCK: tl.constexpr):
    """Step and weight of branch BRANCH, and zeroed lane-wise accumulators for its two gradient sums."""
    s = tl.load(steps_ptr + BRANCH)
    p = tl.load(probs_ptr + BRANCH)
    return s, p, tl.zeros((BLOCK,), dtype=tl.float32), tl.zeros((BLOCK,), dtype=tl.float32)


@triton.jit
def _weighted_branch(x, steps_ptr, probs_ptr, BRANCH: tl.constexpr, qmin, qmax):
    """p * Q(x; s) of branch BRANCH: fake_quant's forward with a zero offset, then the weight, each product rounded."""
    s = tl.load(steps_ptr + BRANCH)
    p = tl.load(probs_ptr + BRANCH)
    # div_rn: a plain `/` lowers to an approximate division on NVIDIA GPUs, and SPEC asks for the IEEE quotient.
    v = tl.math.div_rn(x, s)
    return p * (_round_clamped(v, qmin, qmax) * s + 0.0)


@triton.jit
def _branch_grads(x, g, s, p, qmin, qmax, coef, acc_step, acc_prob):
    """Adds branch (s, p, qmin, qmax)'s share to dx's coefficient and to its two lane-wise gradient sums."""
    v = tl.math.div_rn(x, s)
    q = _round_clamped(v, qmin, qmax)
    # The range is tested on the unrounded v, as in fake_quant; NaN is outside.
    inside = (v >= qmin) & (v <= qmax)
    coef = coef + tl.where(inside, p, 0.0)
    # Inside the range the clamp is a no-op, so q - v is round(v) - v.
    acc_step += g * tl.where(inside, q - v, tl.where(v < qmin, qmin, qmax))
    acc_prob += g * (q * s)
    return coef, acc_step, acc_prob


@triton.jit
def _store_partials(part_ptr, progs, prog, BRANCH: tl.constexpr, B: tl.constexpr, acc_step, acc_prob, step_scale):
    """Stores a branch's two partials at [BRANCH, prog] (times p * gs) and [B + BRANCH, prog] of (2B, progs)."""
    tl.store(part_ptr + BRANCH * progs + prog, tl.sum(acc_step, axis=0) * step_scale)
    tl.store(part_ptr + (B + BRANCH) * progs + prog, tl.sum(acc_prob, axis=0))


@triton.jit
def _multi_branch_fwd_kernel(
    # pointers
    x_ptr,
    y_ptr,
    steps_ptr,
    probs_ptr,
    numel,
    # the range of each branch as floats; slots past B are unused
    lo0,
    hi0,
    lo1,
    hi1,
    lo2,
    hi2,
    lo3,
    hi3,
    lo4,
    hi4,
    lo5,
    hi5,
    lo6,
    hi6,
    # meta-parameters
    B: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    if INDEX_64:
        # Everything derived from the program id then computes in int64, so offsets past 2^31 do not wrap.
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    # y = p_0*Q_0, then y + p_i*Q_i for i = 1..B-1, in this order (the launch forbids fusing them into FMAs).
    y = _weighted_branch(x, steps_ptr, probs_ptr, 0, lo0, hi0)
    if B > 1:
        y = y + _weighted_branch(x, steps_ptr, probs_ptr, 1, lo1, hi1)
    if B > 2:
        y = y + _weighted_branch(x, steps_ptr, probs_ptr, 2, lo2, hi2)
    if B > 3:
        y = y + _weighted_branch(x, steps_ptr, probs_ptr, 3, lo3, hi3)
    if B > 4:
        y = y + _weighted_branch(x, steps_ptr, probs_ptr, 4, lo4, hi4)
    if B > 5:
        y = y + _weighted_branch(x, steps_ptr, probs_ptr, 5, lo5, hi5)
    if B > 6:
        y = y + _weighted_branch(x, steps_ptr, probs_ptr, 6, lo6, hi6)
    _store_rounded(y_ptr, offs, y, mask)


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
    # the range and gradient scale of each branch as floats; slots past B are unused
    lo0,
    hi0,
    gs0,
    lo1,
    hi1,
    gs1,
    lo2,
    hi2,
    gs2,
    lo3,
    hi3,
    gs3,
    lo4,
    hi4,
    gs4,
    lo5,
    hi5,
    gs5,
    lo6,
    hi6,
    gs6,
    # meta-parameters
    B: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    prog = tl.program_id(0)
    if INDEX_64:
        prog = prog.to(tl.int64)

    # The branch constants, loaded once, and the lane-wise float32 accumulators of the two gradient sums, reduced
    # once after the loop. The launcher keeps a program's share to a few thousand elements, so float32 error stays
    # orders of magnitude below SPEC's 1e-4. Slots past B are never defined nor used.
    s0, p0, acc_s0, acc_p0 = _branch_init(steps_ptr, probs_ptr, 0, BLOCK)
    if B > 1:
        s1, p1, acc_s1, acc_p1 = _branch_init(steps_ptr, probs_ptr, 1, BLOCK)
    if B > 2:
        s2, p2, acc_s2, acc_p2 = _branch_init(steps_ptr, probs_ptr, 2, BLOCK)
    if B > 3:
        s3, p3, acc_s3, acc_p3 = _branch_init(steps_ptr, probs_ptr, 3, BLOCK)
    if B > 4:
        s4, p4, acc_s4, acc_p4 = _branch_init(steps_ptr, probs_ptr, 4, BLOCK)
    if B > 5:
        s5, p5, acc_s5, acc_p5 = _branch_init(steps_ptr, probs_ptr, 5, BLOCK)
    if B > 6:
        s6, p6, acc_s6, acc_p6 = _branch_init(steps_ptr, probs_ptr, 6, BLOCK)

    for k in range(tiles_per_prog):
        # The last program may run past the final tile; such a tile is fully masked. Masked lanes load x = g = 0
        # (v = 0, q = 0), so they add exact zeros.
        offs = (prog * tiles_per_prog + k) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)

        # coef = 0 + p_0*inside_0 + p_1*inside_1 + ..., in branch order like the reference.
        coef = tl.zeros((BLOCK,), dtype=tl.float32)
        coef, acc_s0, acc_p0 = _branch_grads(x, g, s0, p0, lo0, hi0, coef, acc_s0, acc_p0)
        if B > 1:
            coef, acc_s1, acc_p1 = _branch_grads(x, g, s1, p1, lo1, hi1, coef, acc_s1, acc_p1)
        if B > 2:
            coef, acc_s2, acc_p2 = _branch_grads(x, g, s2, p2, lo2, hi2, coef, acc_s2, acc_p2)
        if B > 3:
            coef, acc_s3, acc_p3 = _branch_grads(x, g, s3, p3, lo3, hi3, coef, acc_s3, acc_p3)
        if B > 4:
            coef, acc_s4, acc_p4 = _branch_grads(x, g, s4, p4, lo4, hi4, coef, acc_s4, acc_p4)
        if B > 5:
            coef, acc_s5, acc_p5 = _branch_grads(x, g, s5, p5, lo5, hi5, coef, acc_s5, acc_p5)
        if B > 6:
            coef, acc_s6, acc_p6 = _branch_grads(x, g, s6, p6, lo6, hi6, coef, acc_s6, acc_p6)
        # A plain product, as SPEC writes it (an infinite g times a zero coefficient is NaN, as in the reference).
        _store_rounded(dx_ptr, offs, g * coef, mask)

    # dL/ds_i = p_i * gs_i * sum(...): the scale is applied to each float32 partial (a relative error of about
    # 1e-7), which leaves the launcher one float64 sum for all 2*B gradients and needs no host data on the device.
    # gs_i travels as a float32 argument, so a scale below float32's normal range (1e-38) would lose precision.
    _store_partials(part_ptr, progs, prog, 0, B, acc_s0, acc_p0, p0 * gs0)
    if B > 1:
        _store_partials(part_ptr, progs, prog, 1, B, acc_s1, acc_p1, p1 * gs1)
    if B > 2:
        _store_partials(part_ptr, progs, prog, 2, B, acc_s2, acc_p2, p2 * gs2)
    if B > 3:
        _store_partials(part_ptr, progs, prog, 3, B, acc_s3, acc_p3, p3 * gs3)
    if B > 4:
        _store_partials(part_ptr, progs, prog, 4, B, acc_s4, acc_p4, p4 * gs4)
    if B > 5:
        _store_partials(part_ptr, progs, prog, 5, B, acc_s5, acc_p5, p5 * gs5)
    if B > 6:
        _store_partials(part_ptr, progs, prog, 6, B, acc_s6, acc_p6, p6 * gs6)


# Elements per tile, as in fake_quant: the forward streams one tile per program (8 elements per thread); the
# backward loops over smaller ones (4 per thread), as it also keeps 2*B lane-wise accumulators. Compiled for sm_90,
# B = 7 then takes about 155 registers per thread and spills nothing (8 warps allow up to 255; 16 would cap it at
# 128 and spill).
_FWD_TILE = 2048
_BWD_TILE = 1024


def _branch_args(steps, probs, qmin, qmax, *extra) -> tuple[int, list[float]]:
    """B, and the per-branch float arguments interleaved (lo_i, hi_i[, extra_i]), padded to MAX_BRANCHES slots."""
    count = steps.numel()
    if not 1 <= count <= MAX_BRANCHES:
        raise ValueError(f"the Triton multi-branch kernels take 1..{MAX_BRANCHES} branches, got {count}")
    columns = (qmin, qmax, *extra)
    if probs.numel() != count or any(len(c) != count for c in columns):
        raise ValueError("steps, probs, qmin, qmax (and grad_scale) must all have one entry per branch")
    args = []
    for i in range(MAX_BRANCHES):
        args += [float(c[i]) if i < count else 0.0 for c in columns]
    return count, args


def forward(x, steps, probs, qmin: list[int], qmax: list[int]) -> torch.Tensor:
    """y = sum_i probs[i] * Q(x; steps[i], qmin[i], qmax[i]); x contiguous with numel > 0, steps/probs (B,) f32."""
    count, branch_args = _branch_args(steps, probs, qmin, qmax)
    y = torch.empty_like(x)
    numel = x.numel()
    progs = triton.cdiv(numel, _FWD_TILE)
    _multi_branch_fwd_kernel[(progs,)](
        x,
        y,
        steps,
        probs,
        numel,
        *branch_args,
        B=count,
        # Offsets run up to progs * tile, past numel in the last tile.
        INDEX_64=progs * _FWD_TILE >= _INT32_LIMIT,
        BLOCK=_FWD_TILE,
        num_warps=_num_warps(_FWD_TILE),
        # The reference rounds every product and sum; a fused multiply-add would round once and change y's bits.
        enable_fp_fusion=False,
    )
    return y


def backward(grad, x, steps, probs, qmin: list[int], qmax: list[int], grad_scale: list[float]):
    """(dx, dsteps, dprobs); dsteps[i] = probs[i] * grad_scale[i] * sum(g * dQ_i/ds_i), dprobs[i] = sum(g * Q_i)."""
    count, branch_args = _branch_args(steps, probs, qmin, qmax, grad_scale)
    dx = torch.empty_like(x)
    numel = x.numel()
    tiles = triton.cdiv(numel, _BWD_TILE)

    # As many tiles per program as float32 accuracy allows, fewer when that would leave the GPU short of programs.
    by_accuracy = max(1, _MAX_PARTIAL_TERMS // _BWD_TILE)
    by_parallelism = max(1, tiles // _MIN_PROGRAMS)
    tiles_per_prog = min(by_accuracy, by_parallelism, tiles)
    progs = triton.cdiv(tiles, tiles_per_prog)
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
        INDEX_64=progs * tiles_per_prog * _BWD_TILE >= _INT32_LIMIT,
        BLOCK=_BWD_TILE,
        num_warps=_num_warps(_BWD_TILE),
        # Same element math as the forward, and dx's coefficient summed like the reference's.
        enable_fp_fusion=False,
    )
    # A tiny deterministic reduction; float64 makes its own rounding negligible at any size.
    sums = partials.sum(dim=1, dtype=torch.float64)
    return dx, sums[:count].to(torch.float32), sums[count:].to(torch.float32)
