"""The packed inference GEMM (SPEC section 4) in Triton: y = x @ dequant(W).T + bias with exact integer products.

Three kernels, launched in this order by ``forward``:

    _quantize_kernel   x (M, K) float -> int8 codes (M, K) and one NaN flag per row. One program per (row, chunk
                       of K): IEEE division (div_rn), clamp, round half to even; a chunk holding a NaN sets its row's
                       flag (a plain store of 1 into a zeroed int32, so racing programs agree and no atomics are
                       needed); the NaN element itself gets code 0.
    _gemv_kernel       M <= 16: split-K. Program (n block, split) walks its share of the K tiles; the weight tile
                       is loaded packed (BLOCK_K / codes-per-byte bytes down K) and unpacked in registers (shift the
                       field to the top of an int32, arithmetic shift back: sign extension for free). M == 1 uses
                       lane-wise int32 multiply-adds reduced once after the loop (no padded rows); 2 <= M <= 16 pads
                       M to 16 rows and uses the int8 ``tl.dot`` with int32 accumulation. With SPLIT_K == 1 the
                       program applies the epilogue itself; otherwise it stores int32 partials (SPLIT_K, M, N) and
                       _splitk_epilogue_kernel adds them and applies the epilogue once. Integer sums are exact, so
                       the result is the same for every split, every order and every GPU.
    _gemm_kernel       M > 16: tiled GEMM, BLOCK_M x BLOCK_N output tiles in grouped order (L2 reuse of weight
                       tiles), the whole K loop per program with int8 ``tl.dot`` into an int32 accumulator, the
                       epilogue fused.

Epilogue (shared): y = float32(acc) * float32(x_step * w_scale[n]) + bias[n], each operation rounded on its own
(``enable_fp_fusion=False``), rows flagged NaN replaced by NaN, stored in x's dtype with round to nearest even:
the reference backend's float32 expression, so results agree bit for bit.

Unsigned 8-bit activations (codes 0..255) do not fit the s8 x s8 ``tl.dot``. They are stored shifted,
qx - 128 (in -128..127), and the kernels add back 128 * sum_k qw[n, k], a per-column sum of the unpacked weight
tiles taken in the same loop (X_SHIFT = 128; every narrower unsigned range, 0..127 and below, and every signed one
fits int8 unshifted, X_SHIFT = 0). All of it is int32 arithmetic, exact whenever the true sum fits in int32 (which
the contract asks of acc anyway); the M == 1 lane-wise path simply adds the 128 back before multiplying.

Weight codes past K (the padding of the last byte, zero in the canonical layout) are masked to zero after the
unpack, so a non-canonical padding cannot leak into the sums: results equal the reference's, which drops them.

Configurations: on a GPU ``triton.autotune`` picks them per (M bucket, N, K, weight container width, shift, dtypes)
and caches its timings on disk per device (``cache_results``); under the Triton interpreter (TRITON_INTERPRET=1,
CPU tensors, how the tests run) one small fixed configuration per kernel keeps the tests fast. Both go through the
same launch code; ``forward(..., path=, config=)`` overrides the choice (tests use it to reach every path).
``LOWBIT_TRITON_AUTOTUNE`` bounds the GPU search, which compiles every configuration once per specialization (a
fresh GPU machine has no cache): ``full`` (default) all of them, ``quick`` a subset (4 warps, fewer BLOCK_K and
SPLIT_K choices: tools/gpu_check.sh's time-boxed benchmark), ``off`` the fixed configuration (its test run).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from lowbit.kernels.common import num_warps, round_clamped, store_rounded, unrounded_level

from lowbit.core.packing import CONTAINER_BITS

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_AUTOTUNE = os.environ.get("LOWBIT_TRITON_AUTOTUNE", "full")
if _AUTOTUNE not in ("full", "quick", "off"):
    raise ValueError(f"LOWBIT_TRITON_AUTOTUNE must be full, quick or off; got {_AUTOTUNE!r}")
_FIXED_CONFIG = _INTERPRET or _AUTOTUNE == "off"

# M at or below this takes the split-K GEMV, above it the tiled GEMM.
GEMV_MAX_M = 16
# Elements of x per quantize program.
_QUANT_BLOCK = 2048


# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    flag_ptr,
    step_ptr,
    K,
    chunks,
    qmin,
    qmax,
    X_SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """q[m, k] = clamp(rint(x[m, k] / step), qmin, qmax) - X_SHIFT as int8; flag[m] = 1 if row m holds a NaN."""
    pid = tl.program_id(0)
    row = pid // chunks
    chunk = pid % chunks
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    offs = row.to(tl.int64) * K + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(step_ptr)
    # round_clamped clamps first (so infinities land on the range ends), then rounds half to even.
    level = round_clamped(unrounded_level(x, s, 0.0), qmin, qmax)
    is_nan = x != x
    code = tl.where(is_nan, 0.0, level).to(tl.int32) - X_SHIFT
    tl.store(q_ptr + offs, code.to(tl.int8), mask=mask)
    # Masked lanes loaded 0.0, never NaN. Every program that sees a NaN stores the same 1: no atomics needed.
    nan_count = tl.sum(is_nan.to(tl.int32), axis=0)
    tl.store(flag_ptr + row, 1, mask=nan_count > 0)


@triton.jit
def _weight_tile(w_ptr, w_rows, n_mask, k0, K, KB, WIDTH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Signed int8 codes W[n, k0:k0 + BLOCK_K] as a (BLOCK_K, BLOCK_N) tile, unpacked from the canonical layout.

    w_rows: int64 (BLOCK_N,) offsets of the packed rows, KB bytes each. Codes at k >= K are returned as 0.
    """
    PER_BYTE: tl.constexpr = 8 // WIDTH
    BYTES: tl.constexpr = BLOCK_K // PER_BYTE
    kb = k0 // PER_BYTE + tl.arange(0, BYTES)
    # (BYTES, BLOCK_N): K is the contiguous axis of packed_w, so each column is a contiguous run of bytes.
    p = tl.load(w_ptr + w_rows[None, :] + kb[:, None], mask=(kb < KB)[:, None] & n_mask[None, :], other=0)
    if PER_BYTE == 1:
        w = p.to(tl.int8, bitcast=True)
    else:
        # Field i of a byte holds code PER_BYTE * j + i. Shift it to the top of an int32, then arithmetic-shift it
        # back down: that sign-extends the two's-complement field. (BYTES, PER_BYTE, BLOCK_N) flattens row-major
        # into (BLOCK_K, BLOCK_N) with k = PER_BYTE * j + i, the canonical order.
        field = tl.arange(0, PER_BYTE)
        up = 32 - WIDTH - field * WIDTH
        v = (p.to(tl.int32)[:, None, :] << up[None, :, None]) >> (32 - WIDTH)
        w = tl.reshape(v, (BLOCK_K, BLOCK_N)).to(tl.int8)
    k = k0 + tl.arange(0, BLOCK_K)
    return tl.where((k < K)[:, None], w, tl.zeros_like(w))


@triton.jit
def _dot_k_tile(
    acc,
    w_sum,
    q_ptr,
    w_ptr,
    x_rows,
    m_mask,
    w_rows,
    n_mask,
    k0,
    K,
    KB,
    X_SHIFT: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Adds the K tile at k0 to the int32 (BLOCK_M, BLOCK_N) ``acc``: x codes times W codes by an int8 ``tl.dot``.

    For shifted (unsigned) codes it also adds the tile's per-column weight sums to ``w_sum``: the caller adds
    X_SHIFT * w_sum to acc once, after its K loop (each kernel keeps its own loop form, which the compiler's
    offset analysis is sensitive to).
    """
    k = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(q_ptr + x_rows[:, None] + k[None, :], mask=m_mask[:, None] & (k < K)[None, :], other=0)
    w = _weight_tile(w_ptr, w_rows, n_mask, k0, K, KB, WIDTH, BLOCK_K, BLOCK_N)
    acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    if X_SHIFT != 0:
        w_sum += tl.sum(w.to(tl.int32), axis=0)
    return acc, w_sum


@triton.jit
def _epilogue(
    acc,
    offs_m,
    offs_n,
    M,
    N,
    y_ptr,
    w_scale_ptr,
    step_ptr,
    bias_ptr,
    flag_ptr,
    HAS_BIAS: tl.constexpr,
):
    """y = float32(acc) * (x_step * w_scale[n]) (+ bias[n]), NaN rows, stored in y's dtype (round to nearest even)."""
    m_mask = offs_m < M
    n_mask = offs_n < N
    scale = tl.load(step_ptr) * tl.load(w_scale_ptr + offs_n, mask=n_mask, other=1.0)
    y = acc.to(tl.float32) * scale[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    nan_row = tl.load(flag_ptr + offs_m, mask=m_mask, other=0) != 0
    y = tl.where(nan_row[:, None], float("nan"), y)
    offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    store_rounded(y_ptr, offs, y, m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gemv_kernel(
    q_ptr,
    w_ptr,
    y_ptr,
    part_ptr,
    w_scale_ptr,
    step_ptr,
    bias_ptr,
    flag_ptr,
    M,
    N,
    K,
    KB,
    M_BUCKET,  # autotuning key only
    X_SHIFT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    w_rows = offs_n.to(tl.int64) * KB
    x_rows = offs_m.to(tl.int64) * K

    # This split's K tiles: [t0, t1) out of cdiv(K, BLOCK_K); the last splits may get fewer or none.
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = split * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)

    if BLOCK_M == 1:
        # One row: lane-wise products, summed over K once after the loop.
        lanes = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.int32)
        for t in range(t0, t1):
            k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            w = _weight_tile(w_ptr, w_rows, n_mask, t * BLOCK_K, K, KB, WIDTH, BLOCK_K, BLOCK_N)
            a = tl.load(q_ptr + k, mask=k < K, other=0).to(tl.int32) + X_SHIFT  # the true code, 0..255 unsigned
            lanes += a[:, None] * w.to(tl.int32)
        acc = tl.sum(lanes, axis=0)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for t in range(t0, t1):
            k0 = t * BLOCK_K
            acc, w_sum = _dot_k_tile(
                acc, w_sum, q_ptr, w_ptr, x_rows, m_mask, w_rows, n_mask, k0, K, KB, X_SHIFT, WIDTH, BLOCK_N, BLOCK_K
            )
        if X_SHIFT != 0:
            acc += X_SHIFT * w_sum[None, :]

    if SPLIT_K == 1:
        _epilogue(acc, offs_m, offs_n, M, N, y_ptr, w_scale_ptr, step_ptr, bias_ptr, flag_ptr, HAS_BIAS)
    else:
        offs = (split * M + offs_m).to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + offs, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _splitk_epilogue_kernel(
    part_ptr,
    y_ptr,
    w_scale_ptr,
    step_ptr,
    bias_ptr,
    flag_ptr,
    M,
    N,
    split_k,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Adds the int32 partials of every split (exact, so order does not matter), then the epilogue once."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for s in range(split_k):
        offs = (s * M + offs_m).to(tl.int64)[:, None] * N + offs_n[None, :]
        acc += tl.load(part_ptr + offs, mask=mask, other=0)
    _epilogue(acc, offs_m, offs_n, M, N, y_ptr, w_scale_ptr, step_ptr, bias_ptr, flag_ptr, HAS_BIAS)


@triton.jit
def _gemm_kernel(
    q_ptr,
    w_ptr,
    y_ptr,
    w_scale_ptr,
    step_ptr,
    bias_ptr,
    flag_ptr,
    M,
    N,
    K,
    KB,
    M_BUCKET,  # autotuning key only
    X_SHIFT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering (as in the Triton matmul tutorial): GROUP_M row blocks sweep the column blocks together, so
    # the weight tiles they share are still in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = offs_m.to(tl.int64) * K
    w_rows = offs_n.to(tl.int64) * KB

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    w_sum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        acc, w_sum = _dot_k_tile(
            acc, w_sum, q_ptr, w_ptr, x_rows, m_mask, w_rows, n_mask, k0, K, KB, X_SHIFT, WIDTH, BLOCK_N, BLOCK_K
        )
    if X_SHIFT != 0:
        acc += X_SHIFT * w_sum[None, :]
    _epilogue(acc, offs_m, offs_n, M, N, y_ptr, w_scale_ptr, step_ptr, bias_ptr, flag_ptr, HAS_BIAS)


# ---------------------------------------------------------------------------------------------------------------
# Configurations: autotuned on a GPU, fixed under the interpreter
# ---------------------------------------------------------------------------------------------------------------

_KEY = ["M_BUCKET", "N", "K", "WIDTH", "X_SHIFT"]


def _gemv_configs() -> list[triton.Config]:
    quick = _AUTOTUNE == "quick"
    configs = []
    for block_n in (32, 64, 128):
        for block_k in (256, 512) if quick else (128, 256, 512):
            for split_k in (1, 4, 16) if quick else (1, 2, 4, 8, 16):
                for warps in (4,) if quick else (4, 8):
                    configs.append(
                        triton.Config(
                            {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k}, num_warps=warps, num_stages=3
                        )
                    )
    return configs


def _prune_gemv(configs, named_args, **kwargs):
    """Drops configurations that cannot pay off for this shape (keeps the tuning time down)."""
    # The autotuner passes the positional arguments as named_args and the keyword ones (M, N, K, ... here) apart.
    args = {**named_args, **kwargs}
    k, n, block_m = args["K"], args["N"], args["BLOCK_M"]
    kept = []
    for c in configs:
        bk, bn, split = c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"]
        if split > 1 and triton.cdiv(k, bk) < 2 * split:  # splits of fewer than two K tiles
            continue
        if bk > 2 * triton.next_power_of_2(k) or bn > 2 * triton.next_power_of_2(n):
            continue
        if block_m == 1 and bk * bn > 16384:  # the lane-wise accumulator lives in registers
            continue
        kept.append(c)
    return kept or configs[:1]


def _gemm_configs() -> list[triton.Config]:
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 128, 8, 3),
        (128, 128, 64, 4, 4),
        (128, 64, 128, 4, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 4, 4),
        (32, 128, 128, 4, 4),
        (32, 64, 256, 4, 3),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


def _prune_gemm(configs, named_args, **kwargs):
    m = {**named_args, **kwargs}["M"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(m))]
    return kept or configs[:1]


# Under the interpreter (and with LOWBIT_TRITON_AUTOTUNE=off): small tiles, and split-K on, so the tests run every
# code path quickly.
_INTERPRETER_GEMV = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2}
_INTERPRETER_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}


def _autotuned(kernel, configs: list[triton.Config], prune):
    """``kernel`` autotuned over ``configs`` per _KEY, timings cached on disk; the kernel itself with a fixed config."""
    if _FIXED_CONFIG:
        return kernel
    return triton.autotune(configs, key=_KEY, prune_configs_by={"early_config_prune": prune}, cache_results=True)(
        kernel
    )


def _kernel_and_meta(kernel, tuned, fixed: dict, config: dict | None):
    """What to launch and its meta-parameters: ``config`` if given, else the fixed configuration under the
    interpreter (or with autotuning off), else the autotuned kernel, which picks them itself."""
    if config is not None or _FIXED_CONFIG:
        return kernel, dict(config or fixed)
    return tuned, {}


_gemv_tuned = _autotuned(_gemv_kernel, _gemv_configs(), _prune_gemv)
_gemm_tuned = _autotuned(_gemm_kernel, _gemm_configs(), _prune_gemm)

_MAX_SPLIT_K = 16  # the largest SPLIT_K of _gemv_configs: the partial buffer is sized for it


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 8192)


def forward(
    x,
    packed_w,
    w_scale,
    w_bits: int,
    x_step,
    qmin: int,
    qmax: int,
    bias,
    *,
    path: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """packed_linear on contiguous x (M, K), packed_w (N, KB) uint8, w_scale (N,) and x_step (1,) float32.

    ``path`` ("gemv" or "gemm") and ``config`` (the kernel's meta-parameters, e.g. {"BLOCK_N": 32, "BLOCK_K": 64,
    "SPLIT_K": 3}) override the automatic choice; they exist for tests and benchmarks. The GEMV takes M <= 16.
    """
    m, k = x.shape
    n, kb = packed_w.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        # No products: acc = 0 everywhere, then the same float32 epilogue (no row can hold a NaN).
        acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        out = acc * (x_step * w_scale)
        if bias is not None:
            out = out + bias
        return out.to(x.dtype)
    if path is None:
        path = "gemv" if m <= GEMV_MAX_M else "gemm"
    if path not in ("gemv", "gemm") or (path == "gemv" and m > GEMV_MAX_M):
        raise ValueError(f"path must be 'gemm', or 'gemv' for M <= {GEMV_MAX_M}; got {path!r} with M={m}")

    width = CONTAINER_BITS[w_bits]
    x_shift = 128 if qmax > 127 else 0
    has_bias = bias is not None
    bias_arg = bias if has_bias else w_scale  # never read without HAS_BIAS

    codes = torch.empty((m, k), dtype=torch.int8, device=x.device)
    nan_rows = torch.zeros((m,), dtype=torch.int32, device=x.device)
    block = min(_QUANT_BLOCK, triton.next_power_of_2(k))
    chunks = triton.cdiv(k, block)
    _quantize_kernel[(m * chunks,)](
        x,
        codes,
        nan_rows,
        x_step,
        k,
        chunks,
        float(qmin),
        float(qmax),
        X_SHIFT=x_shift,
        BLOCK=block,
        num_warps=num_warps(block),
    )

    common = dict(M=m, N=n, K=k, KB=kb, M_BUCKET=_m_bucket(m), X_SHIFT=x_shift, HAS_BIAS=has_bias, WIDTH=width)
    if path == "gemm":
        kernel, meta = _kernel_and_meta(_gemm_kernel, _gemm_tuned, _INTERPRETER_GEMM, config)

        def grid(meta_):
            return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)

        kernel[grid](codes, packed_w, y, w_scale, x_step, bias_arg, nan_rows, **common, **meta, enable_fp_fusion=False)
        return y

    block_m = 1 if m == 1 else GEMV_MAX_M
    kernel, meta = _kernel_and_meta(_gemv_kernel, _gemv_tuned, _INTERPRETER_GEMV, config)
    max_split = meta.get("SPLIT_K", _MAX_SPLIT_K)
    partials = torch.empty((max_split, m, n), dtype=torch.int32, device=x.device) if max_split > 1 else y

    def grid(meta_):
        return (triton.cdiv(n, meta_["BLOCK_N"]), meta_["SPLIT_K"])

    kernel[grid](
        codes,
        packed_w,
        y,
        partials,
        w_scale,
        x_step,
        bias_arg,
        nan_rows,
        **common,
        BLOCK_M=block_m,
        **meta,
        enable_fp_fusion=False,
    )
    split_k = meta["SPLIT_K"] if meta else _gemv_tuned.best_config.kwargs["SPLIT_K"]
    if split_k > 1:
        block_n = 64
        _splitk_epilogue_kernel[(triton.cdiv(n, block_n),)](
            partials,
            y,
            w_scale,
            x_step,
            bias_arg,
            nan_rows,
            m,
            n,
            split_k,
            HAS_BIAS=has_bias,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=4,
            enable_fp_fusion=False,
        )
    return y
