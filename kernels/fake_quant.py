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

# Adding 1.5 * 2^23 to a float32 of magnitude below 2^22 leaves no mantissa bits for its fraction, so the add itself
# rounds it to an integer, half to even; subtracting the constant back is exact. libdevice's rint would do the same
# on a GPU but is missing from the Triton interpreter, which is how the tests run without one.
_ROUND_MAGIC = tl.constexpr(12582912.0)


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
def _channel_params(
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
def _round_clamped(v, qmin, qmax):
    """round(clamp(v, qmin, qmax)), which equals clamp(round(v), qmin, qmax) because the bounds are integers."""
    # Clamping first keeps |v| <= 255, where the magic-number rounding is exact. NaN fails both comparisons and
    # comes out unchanged, as torch.clamp propagates it (tl.minimum / tl.maximum may return the other operand).
    c = tl.where(v < qmin, qmin, tl.where(v > qmax, qmax, v))
    return (c + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _store_rounded(ptr, offs, y, mask):
    """Stores float32 ``y`` into ``ptr``'s dtype, rounding to nearest even like torch's ``.to()``."""
    if ptr.dtype.element_ty == tl.bfloat16:
        # GPUs convert to bfloat16 with round to nearest even, but the Triton interpreter truncates (and mangles
        # subnormals). Rounding the float32 bits here and storing the top half as bits gives torch's result on
        # both, subnormals included. NaN becomes the canonical bfloat16 NaN.
        bits = y.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        bits = tl.where(y != y, 0x7FC0, bits).to(tl.uint16)
        tl.store(ptr + offs, bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, y.to(ptr.dtype.element_ty), mask=mask)


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
    pid = tl.program_id(0)
    if INDEX_64:
        # Everything derived from the program id then computes in int64, so offsets past 2^31 do not wrap.
        pid = pid.to(tl.int64)
    group = pid // tiles
    tile = pid % tiles

    offs, mask = _tile(
        group, tile, n_rows, n_cols, row_stride, group_stride, col_tiles, CHANNEL_AXIS, BLOCK_ROWS, BLOCK_COLS
    )
    s, beta = _channel_params(step_ptr, offset_ptr, group, channels, HAS_OFFSET, CHANNEL_AXIS, BLOCK_ROWS, BLOCK_COLS)

    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # div_rn: a plain `/` lowers to an approximate division on NVIDIA GPUs, and SPEC asks for the IEEE quotient.
    v = tl.math.div_rn(x - beta, s)
    y = _round_clamped(v, qmin, qmax) * s + beta
    _store_rounded(y_ptr, offs, y, mask)


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
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    group = pid // progs
    prog = pid % progs

    s, beta = _channel_params(step_ptr, offset_ptr, group, channels, HAS_OFFSET, CHANNEL_AXIS, BLOCK_ROWS, BLOCK_COLS)

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

        v = tl.math.div_rn(x - beta, s)
        # LSQ tests the range on the unrounded v (torch's learnable fake quant uses the rounded one); NaN is outside.
        inside = (v >= qmin) & (v <= qmax)
        # where, not g * inside: an infinite g must give 0 outside the range, not inf * 0 = NaN.
        tl.store(dx_ptr + offs, tl.where(inside, g_raw, 0.0), mask=mask)

        dq_dstep = tl.where(inside, _round_clamped(v, qmin, qmax) - v, tl.where(v < qmin, qmin, qmax))
        # Masked lanes load x = g = 0 (v = 0, inside the range), so they add exact zeros.
        acc_step += g * dq_dstep
        acc_offset += tl.where(inside, 0.0, g)

    # One partial per channel of the group, at [channel, prog] of the (channels, progs) buffers.
    if CHANNEL_AXIS == "rows":
        ch = group * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        tl.store(dstep_part_ptr + ch * progs + prog, tl.sum(acc_step, axis=1), mask=ch < channels)
        tl.store(doffset_part_ptr + ch * progs + prog, tl.sum(acc_offset, axis=1), mask=ch < channels)
    elif CHANNEL_AXIS == "cols":
        ch = group * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        tl.store(dstep_part_ptr + ch * progs + prog, tl.sum(acc_step, axis=0), mask=ch < channels)
        tl.store(doffset_part_ptr + ch * progs + prog, tl.sum(acc_offset, axis=0), mask=ch < channels)
    else:
        tl.store(dstep_part_ptr + group * progs + prog, tl.sum(tl.sum(acc_step, axis=1), axis=0))
        tl.store(doffset_part_ptr + group * progs + prog, tl.sum(tl.sum(acc_offset, axis=1), axis=0))


# Elements per tile. The forward streams one big tile per program; the backward loops over smaller ones, which
# keeps its register footprint (two accumulators besides the data) modest.
_FWD_TILE = 2048
_BWD_TILE = 1024
# Channels per tile when they are the contiguous axis: 32 make rows of whole 32-byte sectors (64 to 128 bytes) and
# leave the tile deep. Each program there owns this many partials, so it also sets their count: about
# _MIN_PROGRAMS * _MAX_CHANNEL_COLS, until numel / _MAX_PARTIAL_TERMS outgrows that.
_MAX_CHANNEL_COLS = 32
# The backward sums at most this many elements of one channel into one float32 partial...
_MAX_PARTIAL_TERMS = 4096
# ...but shortens its per-program loop rather than launch fewer programs than this (several per SM of a big GPU).
_MIN_PROGRAMS = 2048
# int32 offsets suffice below this many elements: every offset of an unmasked lane is below numel. Masked lanes
# past the end may wrap around, but they are never dereferenced.
_INT32_LIMIT = 2**31


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


def _num_warps(tile_elems: int) -> int:
    return max(1, min(8, tile_elems // 256))


def forward(x, step, offset, qmin: int, qmax: int, inner: int) -> torch.Tensor:
    """y = fake_quant(x); x contiguous with numel > 0, step (C,) float32, offset (C,) float32 or None."""
    y = torch.empty_like(x)
    channels = step.numel()
    t = _tiling(x.numel(), channels, inner, _FWD_TILE)
    _fake_quant_fwd_kernel[(t.groups * t.tiles,)](
        x,
        y,
        step,
        step if offset is None else offset,  # never read without HAS_OFFSET
        channels,
        t.n_rows,
        t.n_cols,
        t.row_stride,
        t.group_stride,
        t.col_tiles,
        t.tiles,
        float(qmin),
        float(qmax),
        HAS_OFFSET=offset is not None,
        CHANNEL_AXIS=t.channel_axis,
        INDEX_64=x.numel() >= _INT32_LIMIT,
        BLOCK_ROWS=t.block_rows,
        BLOCK_COLS=t.block_cols,
        num_warps=_num_warps(t.block_rows * t.block_cols),
        # The reference rounds q * s, then adds beta; a fused multiply-add would round once and change y's bits.
        enable_fp_fusion=False,
    )
    return y


def backward(grad, x, step, offset, qmin: int, qmax: int, inner: int, grad_scale: float):
    """(dx, dstep, doffset) of fake_quant; dstep and doffset are float32 (C,), already scaled by grad_scale."""
    dx = torch.empty_like(x)
    channels = step.numel()
    t = _tiling(x.numel(), channels, inner, _BWD_TILE)

    # As many tiles per program as float32 accuracy allows, fewer when that would leave the GPU short of programs.
    # That makes channels * progs partials: about numel / (a channel's elements per program) + channels.
    by_accuracy = max(1, _MAX_PARTIAL_TERMS // t.channel_terms)
    by_parallelism = max(1, t.groups * t.tiles // _MIN_PROGRAMS)
    tiles_per_prog = min(by_accuracy, by_parallelism, t.tiles)
    progs = triton.cdiv(t.tiles, tiles_per_prog)
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
        t.n_rows,
        t.n_cols,
        t.row_stride,
        t.group_stride,
        t.col_tiles,
        t.tiles,
        progs,
        tiles_per_prog,
        float(qmin),
        float(qmax),
        HAS_OFFSET=offset is not None,
        CHANNEL_AXIS=t.channel_axis,
        INDEX_64=x.numel() >= _INT32_LIMIT,
        BLOCK_ROWS=t.block_rows,
        BLOCK_COLS=t.block_cols,
        num_warps=_num_warps(t.block_rows * t.block_cols),
        # Same element math as the forward, so the same v and round(v) - v.
        enable_fp_fusion=False,
    )
    # A tiny deterministic reduction; float64 makes its own rounding negligible at any size.
    dstep = partials[0].sum(dim=1, dtype=torch.float64).mul_(grad_scale).to(torch.float32)
    doffset = partials[1].sum(dim=1, dtype=torch.float64).mul_(grad_scale).to(torch.float32)
    return dx, dstep, doffset
