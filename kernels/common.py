"""What the Triton kernels of ``lowbit.kernels`` share: the quantizer's element math, the rounded store, and the
launch arithmetic of the two-pass (forward, backward with float32 partials) fake-quant kernels.

The element math is the reference's, rounding for rounding, so kernels built from it match the reference bit for
bit: IEEE division, clamp, round half to even, ``q * s + beta`` as a multiply then an add (kernels launch with
``enable_fp_fusion=False`` so that no multiply-add is fused). Every ``@triton.jit`` helper here is inlined into the
kernels that call it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Adding 1.5 * 2^23 to a float32 of magnitude below 2^22 leaves no mantissa bits for its fraction, so the add itself
# rounds it to an integer, half to even; subtracting the constant back is exact. libdevice's rint would do the same
# on a GPU but is missing from the Triton interpreter, which is how the tests run without one.
ROUND_MAGIC = tl.constexpr(12582912.0)

# Elements per tile of the fake-quant kernels. The forward streams one big tile per program (8 elements per thread
# at 8 warps); the backward loops over smaller ones, which keeps its register footprint (gradient accumulators
# besides the data) modest.
FORWARD_TILE = 2048
BACKWARD_TILE = 1024
# A backward sums at most this many elements of one channel into one float32 partial...
MAX_PARTIAL_TERMS = 4096
# ...but shortens its per-program loop rather than launch fewer programs than this (several per SM of a big GPU).
MIN_PROGRAMS = 2048
# int32 offsets suffice below this many elements: every offset of an unmasked lane is below numel. Masked lanes
# past the end may wrap around, but they are never dereferenced.
INT32_LIMIT = 2**31


# ---------------------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def program_index(INDEX_64: tl.constexpr):
    """This program's index along grid axis 0, as int64 when INDEX_64 (then every offset derived from it is int64
    too, so offsets past 2^31 do not wrap)."""
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    return pid


@triton.jit
def unrounded_level(x, s, beta):
    """v = (x - beta) / s, the IEEE quotient."""
    # div_rn: a plain `/` lowers to an approximate division on NVIDIA GPUs.
    return tl.math.div_rn(x - beta, s)


@triton.jit
def round_clamped(v, qmin, qmax):
    """round(clamp(v, qmin, qmax)), which equals clamp(round(v), qmin, qmax) because the bounds are integers."""
    # Clamping first keeps |v| <= 255, where the magic-number rounding is exact. NaN fails both comparisons and
    # comes out unchanged, as torch.clamp propagates it (tl.minimum / tl.maximum may return the other operand).
    c = tl.where(v < qmin, qmin, tl.where(v > qmax, qmax, v))
    return (c + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def fake_quant_value(x, s, beta, qmin, qmax):
    """Q(x) = round(clamp((x - beta) / s, qmin, qmax)) * s + beta, each operation rounded on its own."""
    return round_clamped(unrounded_level(x, s, beta), qmin, qmax) * s + beta


@triton.jit
def lsq_grad_terms(x, s, beta, qmin, qmax):
    """(q, inside, dq_dstep) at x: the clamped level, whether the gradient passes to x, and LSQ's dQ/ds / s."""
    v = unrounded_level(x, s, beta)
    q = round_clamped(v, qmin, qmax)
    # LSQ tests the range on the unrounded v (torch's learnable fake quant uses the rounded one); NaN is outside.
    inside = (v >= qmin) & (v <= qmax)
    # Inside the range the clamp is a no-op, so q - v is round(v) - v; outside, the bound that was hit.
    dq_dstep = tl.where(inside, q - v, tl.where(v < qmin, qmin, qmax))
    return q, inside, dq_dstep


@triton.jit
def store_rounded(ptr, offs, y, mask):
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


# ---------------------------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------------------------


def num_warps(tile_elems: int) -> int:
    """Warps for a program that streams tiles of ``tile_elems`` elements: about 8 elements per thread, 1..8 warps."""
    return max(1, min(8, tile_elems // 256))


def split_backward_work(tiles: int, groups: int, channel_terms: int) -> tuple[int, int]:
    """(tiles_per_prog, progs): how a backward shares the ``tiles`` of each of ``groups`` groups among programs.

    As many consecutive tiles per program as float32 accuracy allows (``channel_terms`` elements of one channel per
    tile), fewer when that would leave the GPU short of programs. Each program writes one partial per channel.
    """
    by_accuracy = max(1, MAX_PARTIAL_TERMS // channel_terms)
    by_parallelism = max(1, groups * tiles // MIN_PROGRAMS)
    tiles_per_prog = min(by_accuracy, by_parallelism, tiles)
    return tiles_per_prog, triton.cdiv(tiles, tiles_per_prog)


def sum_partials(partials: torch.Tensor) -> torch.Tensor:
    """Adds float32 partials along the last dimension in float64: tiny, deterministic, its own rounding negligible."""
    return partials.sum(dim=-1, dtype=torch.float64)
