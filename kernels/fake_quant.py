"""Fused LSQ fake quantization (SPEC section 1) in Triton: one pass forward, one pass backward.

x is viewed as (outer, channels, inner); each step and offset belongs to one channel. Both passes cut x into
BLOCK_ROWS x BLOCK_COLS tiles of a 2-D matrix whose columns are contiguous in memory, so loads coalesce and no
element pays for an integer division. Which matrix, and where a tile's channels come from, depends on the layout:

    CHANNEL_AXIS   when                matrix (rows x cols)   channels of a tile
    "program"      channels == 1       1 x numel              the only one (per-tensor)
    "cols"         inner == 1          outer x channels       its columns: BLOCK_COLS neighbouring channels
    "rows"         outer == 1          channels x inner       its rows: BLOCK_ROWS neighbouring channels
    "program"      otherwise           outer x inner          one per program, at a channel stride of inner

The tiles that share the same channels form a group, and each program works inside one group. The forward takes
one tile per program and writes only y. The backward takes a few consecutive tiles per program, writes dx, and sums
the step and offset gradients of its channels into float32 partials, which the launcher adds up in float64. There
are no atomics (the sums are deterministic) and no temporaries of the size of x.

The element math is the reference's, rounding for rounding, so y and dx match it bit for bit: IEEE division,
round half to even, and ``q * s + beta`` as a multiply then an add.
"""

from __future__ import annotations

from typing import NamedTuple

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


@triton.jit
def _tile(
    group,
    tile,
    n_rows,
    n_cols,
    row_stride,
    group_stride,
    col_tiles,
    CHANNEL_AXIS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Element offsets and bounds mask of tile number ``tile`` of group ``group``."""
    if CHANNEL_AXIS == "rows":
        # The group is a band of rows; its tiles run along them.
        row_block = group
        col_block = tile
    elif CHANNEL_AXIS == "cols":
        # The group is a band of columns; its tiles run down them.
        row_block = tile
        col_block = group
    else:
        # The group owns a whole (n_rows, n_cols) matrix, starting group * group_stride elements in.
        row_block = tile // col_tiles
        col_block = tile % col_tiles
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    offs = group * group_stride + rows[:, None] * row_stride + cols[None, :]
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return offs, mask


@triton.jit
def _load_step_offset(
    step_ptr,
    offset_ptr,
    group,
    channels,
    HAS_OFFSET: tl.constexpr,
    CHANNEL_AXIS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Step and offset of the group's channels, shaped to broadcast over its tiles (offset 0.0 when there is none)."""
    beta = 0.0
    if CHANNEL_AXIS == "rows":
        ch = group * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        # Padding channels get s = 1: their lanes then compute 0 / 1, not 0 / 0, whose NaN would poison the sums.
        s = tl.load(step_ptr + ch, mask=ch < channels, other=1.0)[:, None]
        if HAS_OFFSET:
            beta = tl.load(offset_ptr + ch, mask=ch < channels, other=0.0)[:, None]
    elif CHANNEL_AXIS == "cols":
        ch = group * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        s = tl.load(step_ptr + ch, mask=ch < channels, other=1.0)[None, :]
        if HAS_OFFSET:
            beta = tl.load(offset_ptr + ch, mask=ch < channels, other=0.0)[None, :]
    else:
        s = tl.load(step_ptr + group)
        if HAS_OFFSET:
            beta = tl.load(offset_ptr + group)
    return s, beta


@triton.jit
def _store_channel_partials(
    part_ptr,
    acc,
    group,
    prog,
    progs,
    channels,
    CHANNEL_AXIS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    """Sums the lane-wise ``acc`` per channel of the group into [channel, prog] of the (channels, progs) buffer."""
    if CHANNEL_AXIS == "rows":
        ch = group * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        tl.store(part_ptr + ch * progs + prog, tl.sum(acc, axis=1), mask=ch < channels)
    elif CHANNEL_AXIS == "cols":
        ch = group * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        tl.store(part_ptr + ch * progs + prog, tl.sum(acc, axis=0), mask=ch < channels)
    else:
        tl.store(part_ptr + group * progs + prog, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _fake_quant_fwd_kernel(
    # pointers
    x_ptr,
    y_ptr,
    step_ptr,
    offset_ptr,
    # the matrix and its tiling (see the module docstring)
    channels,
    n_rows,
    n_cols,
    row_stride,
    group_stride,
    col_tiles,
    tiles,
    # quantizer range, as floats
    qmin,
    qmax,
    # meta-parameters
    HAS_OFFSET: tl.constexpr,
    CHANNEL_AXIS: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    pid = program_index(INDEX_64)
    group = pid // tiles
    tile = pid % tiles

    offs, mask = _tile(
        group, tile, n_rows, n_cols, row_stride, group_stride, col_tiles, CHANNEL_AXIS, BLOCK_ROWS, BLOCK_COLS
    )
    s, beta = _load_step_offset(step_ptr, offset_ptr, group, channels, HAS_OFFSET, CHANNEL_AXIS, BLOCK_ROWS, BLOCK_COLS)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    store_rounded(y_ptr, offs, fake_quant_value(x, s, beta, qmin, qmax), mask)


@triton.jit
def _fake_quant_bwd_kernel(
    # pointers
    grad_ptr,
    x_ptr,
    dx_ptr,
    step_ptr,
    offset_ptr,
    dstep_part_ptr,
    doffset_part_ptr,
    # the matrix and its tiling (see the module docstring)
    channels,
    n_rows,
    n_cols,
    row_stride,
    group_stride,
    col_tiles,
    tiles,
    # work split: a group's tiles are shared by `progs` programs, `tiles_per_prog` consecutive tiles each
    progs,
    tiles_per_prog,
    # quantizer range, as floats
    qmin,
    qmax,
    # meta-parameters
    HAS_OFFSET: tl.constexpr,
    CHANNEL_AXIS: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    pid = program_index(INDEX_64)
    group = pid // progs
    prog = pid % progs

    s, beta = _load_step_offset(step_ptr, offset_ptr, group, channels, HAS_OFFSET, CHANNEL_AXIS, BLOCK_ROWS, BLOCK_COLS)

    # Lane-wise float32 accumulators, reduced once after the loop. The launcher keeps each channel's share of a
    # program to a few thousand elements, so float32 error stays orders of magnitude below SPEC's 1e-4.
    acc_step = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    acc_offset = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for k in range(tiles_per_prog):
        # The group's last program may run past its final tile; such a tile is fully masked.
        offs, mask = _tile(
            group,
            prog * tiles_per_prog + k,
            n_rows,
            n_cols,
            row_stride,
            group_stride,
            col_tiles,
            CHANNEL_AXIS,
            BLOCK_ROWS,
            BLOCK_COLS,
        )
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_raw = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        g = g_raw.to(tl.float32)

        _, inside, dq_dstep = lsq_grad_terms(x, s, beta, qmin, qmax)
        # where, not g * inside: an infinite g must give 0 outside the range, not inf * 0 = NaN.
        tl.store(dx_ptr + offs, tl.where(inside, g_raw, 0.0), mask=mask)
        # Masked lanes load x = g = 0 (v = 0, inside the range), so they add exact zeros.
        acc_step += g * dq_dstep
        acc_offset += tl.where(inside, 0.0, g)

    _store_channel_partials(
        dstep_part_ptr, acc_step, group, prog, progs, channels, CHANNEL_AXIS, BLOCK_ROWS, BLOCK_COLS
    )
    _store_channel_partials(
        doffset_part_ptr, acc_offset, group, prog, progs, channels, CHANNEL_AXIS, BLOCK_ROWS, BLOCK_COLS
    )


# Channels per tile when they are the contiguous axis: 32 make rows of whole 32-byte sectors (64 to 128 bytes) and
# leave the tile deep. Each program there owns this many partials, so it also sets their count: about
# MIN_PROGRAMS * _MAX_CHANNEL_COLS, until numel / MAX_PARTIAL_TERMS outgrows that.
_MAX_CHANNEL_COLS = 32


class _Tiling(NamedTuple):
    channel_axis: str
    n_rows: int
    n_cols: int
    row_stride: int
    group_stride: int
    block_rows: int
    block_cols: int
    groups: int
    col_tiles: int  # tiles across the columns of a group's matrix ("program" layout)
    tiles: int  # tiles per group
    channel_terms: int  # elements of one channel in one tile

    def matrix(self) -> tuple[int, ...]:
        """The kernels' tiling arguments, from n_rows to tiles."""
        return self.n_rows, self.n_cols, self.row_stride, self.group_stride, self.col_tiles, self.tiles


def _tiling(numel: int, channels: int, inner: int, tile: int) -> _Tiling:
    np2 = triton.next_power_of_2
    outer = numel // (channels * inner)
    if channels == 1:
        # Strides of 0, not numel: there is one row and one group, and a multiple of 16 lets the compiler prove the
        # tile is aligned, so it emits vector loads whatever numel is.
        axis, n_rows, n_cols, row_stride, group_stride = "program", 1, numel, 0, 0
    elif inner == 1:
        axis, n_rows, n_cols, row_stride, group_stride = "cols", outer, channels, channels, 0
    elif outer == 1:
        axis, n_rows, n_cols, row_stride, group_stride = "rows", channels, inner, inner, 0
    else:
        axis, n_rows, n_cols, row_stride, group_stride = "program", outer, inner, channels * inner, inner

    # Columns first: they are the contiguous axis. A run shorter than a tile is padded to a power of two, which may
    # idle up to half the lanes.
    block_cols = min(np2(n_cols), _MAX_CHANNEL_COLS if axis == "cols" else tile)
    block_rows = min(tile // block_cols, np2(n_rows))
    row_tiles = triton.cdiv(n_rows, block_rows)
    col_tiles = triton.cdiv(n_cols, block_cols)

    if axis == "rows":
        groups, tiles, channel_terms = row_tiles, col_tiles, block_cols
    elif axis == "cols":
        groups, tiles, channel_terms = col_tiles, row_tiles, block_rows
    else:
        groups, tiles, channel_terms = channels, row_tiles * col_tiles, block_rows * block_cols
    return _Tiling(
        axis, n_rows, n_cols, row_stride, group_stride, block_rows, block_cols, groups, col_tiles, tiles, channel_terms
    )


def _launch_options(t: _Tiling, x, offset) -> dict:
    """The meta-parameters and compile options of both kernels for tiling ``t`` of ``x``."""
    return dict(
        HAS_OFFSET=offset is not None,
        CHANNEL_AXIS=t.channel_axis,
        INDEX_64=x.numel() >= INT32_LIMIT,
        BLOCK_ROWS=t.block_rows,
        BLOCK_COLS=t.block_cols,
        num_warps=num_warps(t.block_rows * t.block_cols),
        # The reference rounds q * s, then adds beta; a fused multiply-add would round once and change y's bits
        # (and the backward's v and round(v) - v, which are the forward's).
        enable_fp_fusion=False,
    )


def forward(x, step, offset, qmin: int, qmax: int, inner: int) -> torch.Tensor:
    """y = fake_quant(x); x contiguous with numel > 0, step (C,) float32, offset (C,) float32 or None."""
    y = torch.empty_like(x)
    channels = step.numel()
    t = _tiling(x.numel(), channels, inner, FORWARD_TILE)
    _fake_quant_fwd_kernel[(t.groups * t.tiles,)](
        x,
        y,
        step,
        step if offset is None else offset,  # never read without HAS_OFFSET
        channels,
        *t.matrix(),
        float(qmin),
        float(qmax),
        **_launch_options(t, x, offset),
    )
    return y


def backward(grad, x, step, offset, qmin: int, qmax: int, inner: int, grad_scale: float):
    """(dx, dstep, doffset) of fake_quant; dstep and doffset are float32 (C,), already scaled by grad_scale."""
    dx = torch.empty_like(x)
    channels = step.numel()
    t = _tiling(x.numel(), channels, inner, BACKWARD_TILE)
    # That makes channels * progs partials: about numel / (a channel's elements per program) + channels.
    tiles_per_prog, progs = split_backward_work(t.tiles, t.groups, t.channel_terms)
    # Each (channel, prog) slot is written by exactly one program, so no zero fill is needed.
    partials = torch.empty((2, channels, progs), dtype=torch.float32, device=x.device)

    _fake_quant_bwd_kernel[(t.groups * progs,)](
        grad,
        x,
        dx,
        step,
        step if offset is None else offset,  # never read without HAS_OFFSET
        partials[0],
        partials[1],
        channels,
        *t.matrix(),
        progs,
        tiles_per_prog,
        float(qmin),
        float(qmax),
        **_launch_options(t, x, offset),
    )
    # two separate tensors, not rows of one: outputs of a custom op must not alias each other (opcheck)
    dstep, doffset = (sum_partials(p).mul_(grad_scale).to(torch.float32) for p in partials)
    return dx, dstep, doffset
