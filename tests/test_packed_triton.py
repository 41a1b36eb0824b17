"""The Triton packed_linear kernels (kernels/packed_linear.py) against an independent NumPy int64 reference.

Exact equality everywhere: the contract (lowbit/ops/packed_linear.py) is bit-exact across backends. On a
machine without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1),
which is slow, so the shapes stay small but odd: every tail of every tile is hit. On a GPU, test_real_sizes
adds model-sized shapes.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import DEVICE, TRITON_INTERPRETED

import lowbit

pytestmark = pytest.mark.skipif("triton" not in lowbit.backends(), reason="triton backend unavailable")

CONTAINER = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: NumPy packing per SPEC section 4 and the contract's arithmetic in int64 / float32.
# ---------------------------------------------------------------------------------------------------------------


def np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes (N, K) -> canonical uint8 (N, ceil(K / per_byte)), low fields first, zero padding."""
    width = CONTAINER[bits]
    per_byte = 8 // width
    n, k = codes.shape
    kb = -(-k // per_byte)
    padded = np.zeros((n, kb * per_byte), dtype=np.int64)
    padded[:, :k] = codes
    fields = (padded & ((1 << width) - 1)).reshape(n, kb, per_byte)
    out = np.zeros((n, kb), dtype=np.int64)
    for i in range(per_byte):
        out |= fields[:, :, i] << (i * width)
    return out.astype(np.uint8)


def np_packed_linear(x, qw, w_scale, x_step, qmin, qmax, bias):
    """y in float32 per the contract: int64 accumulation (asserted to fit int32), float32 epilogue."""
    xf = x.float().cpu().numpy()
    step = np.float32(x_step)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        level = np.clip(np.rint(xf / step), qmin, qmax)  # float32 IEEE division, half to even; NaN stays NaN
    nan_rows = np.isnan(xf).any(axis=1)
    q = np.where(np.isnan(level), 0, level).astype(np.int64)
    acc = q @ qw.astype(np.int64).T
    assert np.abs(acc).max(initial=0) < 2**31
    y = acc.astype(np.float32) * (step * np.asarray(w_scale, dtype=np.float32))
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32)
    y[nan_rows] = np.nan
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))


def weights(rng, n, k, bits, extreme=False):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    qw = np.full((n, k), lo, dtype=np.int64) if extreme else rng.integers(lo, hi + 1, size=(n, k))
    return qw, torch.from_numpy(np_pack(qw, bits)).to(DEVICE)


def x_range(x_bits, x_signed):
    return (-(1 << (x_bits - 1)), (1 << (x_bits - 1)) - 1) if x_signed else (0, (1 << x_bits) - 1)


def same_bits(y: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads aside: any NaN equals any NaN)."""
    expected = expected.to(y.dtype)
    y, expected = y.cpu().float(), expected.float()
    both_nan = torch.isnan(y) & torch.isnan(expected)
    return bool((both_nan | (y == expected)).all()) and torch.equal(torch.isnan(y), torch.isnan(expected))


def run_case(
    rng, m, n, k, w_bits, x_bits, x_signed, dtype=torch.float32, *, bias=True, x=None, step=0.05, extreme=False
):
    qw, packed = weights(rng, n, k, w_bits, extreme)
    if x is None:
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32) * 4).to(dtype)
    x = x.to(DEVICE)
    w_scale = torch.from_numpy(rng.uniform(0.01, 0.2, n).astype(np.float32)).to(DEVICE)
    b = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(DEVICE) if bias else None
    x_step = torch.tensor([step], dtype=torch.float32, device=DEVICE)
    with lowbit.use_backend("triton"):
        y = lowbit.packed_linear(x, packed, w_scale, w_bits, x_step, x_bits, x_signed=x_signed, bias=b)
    qmin, qmax = x_range(x_bits, x_signed)
    expected = np_packed_linear(x, qw, w_scale.cpu().numpy(), step, qmin, qmax, None if b is None else b.cpu().numpy())
    assert y.dtype == x.dtype and y.shape == (m, n)
    assert same_bits(y, expected), (y, expected.to(dtype))
    return y


# ---------------------------------------------------------------------------------------------------------------
# Shapes, widths, activation ranges, dtypes
# ---------------------------------------------------------------------------------------------------------------

SHAPES = list(itertools.product((1, 3, 17, 33), (1, 5, 17), (1, 3, 17, 64, 130)))
X_MODES = [(8, False), (8, True), (4, False), (2, True), (3, False), (7, True), (6, False)]


@pytest.mark.parametrize("index", range(len(SHAPES)))
def test_shapes(index):
    """Every (M, N, K) of the grid, the weight width and activation range cycling with the case."""
    m, n, k = SHAPES[index]
    rng = np.random.default_rng(index)
    w_bits = 2 + index % 7
    x_bits, x_signed = X_MODES[index % len(X_MODES)]
    run_case(rng, m, n, k, w_bits, x_bits, x_signed, bias=index % 2 == 0)


@pytest.mark.parametrize("m", [1, 3, 33])  # M == 1 lane-wise GEMV, 2..16 tl.dot GEMV, tiled GEMM
@pytest.mark.parametrize("w_bits", range(2, 9))
@pytest.mark.parametrize("x_mode", [(8, False), (8, True), (5, False), (2, True)])
def test_widths_and_ranges(m, w_bits, x_mode):
    rng = np.random.default_rng(100 * m + 10 * w_bits + x_mode[0])
    run_case(rng, m, 17, 130, w_bits, *x_mode)


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_bits", [2, 4, 8])
def test_dtypes(m, dtype, w_bits):
    rng = np.random.default_rng(7 * m + w_bits)
    run_case(rng, m, 17, 130, w_bits, 8, False, dtype)
    run_case(rng, m, 5, 64, w_bits, 4, True, dtype, step=0.01)


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("w_bits", [2, 8])
def test_unsigned_8bit_extremes(m, w_bits):
    """Codes up to 255 against the most negative weight codes: the shifted path's correction at its largest."""
    rng = np.random.default_rng(m + w_bits)
    x = torch.full((m, 130), 1e6)
    x[:, ::7] = 254.5  # a tie, rounds to 254
    run_case(rng, m, 17, 130, w_bits, 8, False, x=x, step=1.0, extreme=True)
    run_case(rng, m, 17, 130, w_bits, 8, True, x=-x, step=1.0, extreme=True)


# (M, N, K) as in models: M = 1 and 16 (GEMV), 17 (the smallest GEMM), 300 and 4096 (GEMM); odd N and K tails.
REAL_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (17, 1000, 4097), (300, 1024, 4096), (4096, 256, 1024)]


@pytest.mark.skipif(TRITON_INTERPRETED, reason="model sizes run on a GPU only: the Triton interpreter takes minutes")
@pytest.mark.parametrize("shape", REAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("w_bits", [2, 4, 8])
def test_real_sizes(shape, w_bits):
    """The kernels at the sizes they are tuned for, on bf16 activations: signed and unsigned (shifted) 8-bit codes."""
    m, n, k = shape
    rng = np.random.default_rng(sum(shape) + w_bits)
    run_case(rng, m, n, k, w_bits, 8, w_bits != 4, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Rounding, clamping, special values
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_round_half_even(m, dtype):
    rng = np.random.default_rng(m)
    halves = torch.arange(-20, 20, dtype=torch.float32) + 0.5  # exact in every dtype
    x = halves.repeat(m, 4)[:, :130].to(dtype)
    for x_bits, x_signed in [(8, True), (4, True), (8, False), (3, False)]:
        run_case(rng, m, 5, 130, 4, x_bits, x_signed, dtype, x=x, step=1.0)
        run_case(rng, m, 5, 130, 3, x_bits, x_signed, dtype, x=x * 0.25, step=0.25)


def near_ties(step: float) -> torch.Tensor:
    """float32 x at and next to (k + 0.5) * step, where IEEE division and a reciprocal multiply round apart."""
    s = np.float32(step)
    base = ((np.arange(-128, 128, dtype=np.float32) + np.float32(0.5)) * s).astype(np.float32)
    x = np.concatenate([base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(-np.inf))])
    assert (np.rint(x / s) != np.rint(x * (np.float32(1) / s))).sum() >= 10  # the test can tell them apart
    return torch.from_numpy(x)


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("step", [0.1, 0.013])
def test_ieee_division(m, step):
    rng = np.random.default_rng(m)
    x = near_ties(step)[torch.from_numpy(rng.integers(0, 768, m * 130))].reshape(m, 130)
    run_case(rng, m, 17, 130, 8, 8, True, x=x, step=step)
    run_case(rng, m, 17, 130, 4, 8, False, x=x.abs(), step=step)


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("x_signed", [False, True])
def test_clamp_edges_and_infinities(m, x_signed):
    rng = np.random.default_rng(m)
    qmin, qmax = x_range(8, x_signed)
    edges = torch.tensor([qmin - 0.5, qmin - 0.51, qmin, qmax, qmax + 0.49, qmax + 0.5, 1e30, -1e30])
    edges = torch.cat([edges, torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 0.5, -0.5, 1.5, -2.5])])
    x = edges.repeat(m, 5)[:, :67]
    run_case(rng, m, 17, 67, 8, 8, x_signed, x=x, step=1.0)
    run_case(rng, m, 17, 67, 2, 8, x_signed, x=x, step=1.0)


@pytest.mark.parametrize("m", [1, 3, 17, 33])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_rows(m, dtype):
    """A row holding a NaN comes out all NaN; the other rows are untouched."""
    rng = np.random.default_rng(m)
    x = torch.from_numpy(rng.standard_normal((m, 130)).astype(np.float32)).to(dtype)
    x[0, 129] = float("nan")
    if m > 2:
        x[m - 1, 0] = float("nan")
        x[1, 64] = float("inf")
    y = run_case(rng, m, 17, 130, 4, 8, False, dtype, x=x)
    assert torch.isnan(y[0]).all() and (m < 3 or torch.isnan(y[m - 1]).all())
    if m > 2:
        assert not torch.isnan(y[1]).any()


def test_empty():
    rng = np.random.default_rng(0)
    for m, n, k in [(0, 5, 17), (3, 0, 17), (0, 0, 17)]:
        run_case(rng, m, n, k, 4, 8, False)
        run_case(rng, m, n, k, 2, 8, True, bias=False)


@pytest.mark.parametrize("m,n", [(0, 5), (3, 0), (3, 5), (17, 5)])
def test_empty_k(m, n):
    """K == 0: no products, y = 0 * scale + bias, through the kernel module and the public op."""
    from lowbit.kernels import packed_linear as kernels

    x = torch.empty((m, 0), device=DEVICE)
    packed = torch.empty((n, 0), dtype=torch.uint8, device=DEVICE)
    w_scale = torch.full((n,), 0.1, device=DEVICE)
    bias = torch.arange(n, dtype=torch.float32, device=DEVICE)
    for b in (None, bias):
        x_step = torch.tensor([0.5], device=DEVICE)
        expected = np_packed_linear(x, np.zeros((n, 0)), w_scale.cpu().numpy(), 0.5, 0, 255, None if b is None else b)
        y = kernels.forward(x, packed, w_scale, 4, x_step, 0, 255, b)
        assert y.shape == (m, n) and same_bits(y, expected)
        with lowbit.use_backend("triton"):
            y = lowbit.packed_linear(x, packed, w_scale, 4, x_step, 8, bias=b)
        assert y.shape == (m, n) and same_bits(y, expected)


def test_leading_dimensions():
    rng = np.random.default_rng(1)
    qw, packed = weights(rng, 5, 17, 4)
    x = torch.from_numpy(rng.standard_normal((2, 3, 17)).astype(np.float32)).to(DEVICE)
    w_scale = torch.full((5,), 0.1, device=DEVICE)
    x_step = torch.tensor([0.05], device=DEVICE)
    with lowbit.use_backend("triton"):
        y = lowbit.packed_linear(x, packed, w_scale, 4, x_step, 8)
    expected = np_packed_linear(x.reshape(6, 17), qw, w_scale.cpu().numpy(), 0.05, 0, 255, None)
    assert y.shape == (2, 3, 5) and same_bits(y.reshape(6, 5), expected)


def test_padding_bits_are_ignored():
    """Non-canonical bits in the last byte's padding fields do not change the result (the reference drops them)."""
    rng = np.random.default_rng(2)
    for w_bits, k in [(2, 17), (4, 17), (3, 3), (2, 130)]:
        qw, packed = weights(rng, 5, k, w_bits)
        dirty = packed.clone()
        dirty[:, -1] |= torch.tensor(0xFF << ((k % (8 // CONTAINER[w_bits])) * CONTAINER[w_bits]) & 0xFF).to(
            torch.uint8
        )
        assert not torch.equal(dirty, packed)
        x = torch.from_numpy(rng.standard_normal((33, k)).astype(np.float32)).to(DEVICE) * 10
        w_scale = torch.full((5,), 0.1, device=DEVICE)
        x_step = torch.tensor([0.05], device=DEVICE)
        expected = np_packed_linear(x, qw, w_scale.cpu().numpy(), 0.05, 0, 255, None)
        with lowbit.use_backend("triton"):
            for rows in (1, 3, 33):
                y = lowbit.packed_linear(x[:rows], dirty, w_scale, w_bits, x_step, 8)
                assert same_bits(y, expected[:rows])


# ---------------------------------------------------------------------------------------------------------------
# Each kernel path and configuration, called directly
# ---------------------------------------------------------------------------------------------------------------

GEMV_CONFIGS = [
    {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1},
    {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 3},
    {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 8},  # more splits than K tiles for small K: some splits are empty
]
GEMM_CONFIGS = [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1},
    {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 128, "GROUP_M": 4},
]


def direct(rng, m, n, k, w_bits, qmin, qmax, path, config, dtype=torch.float32):
    from lowbit.kernels import packed_linear as kernels

    qw, packed = weights(rng, n, k, w_bits)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32) * 8).to(dtype).to(DEVICE)
    if m:
        x[m // 2, k // 2] = float("nan")
    w_scale = torch.from_numpy(rng.uniform(0.01, 0.2, n).astype(np.float32)).to(DEVICE)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(DEVICE)
    x_step = torch.tensor([0.125], device=DEVICE)
    y = kernels.forward(x, packed, w_scale, w_bits, x_step, qmin, qmax, bias, path=path, config=config)
    expected = np_packed_linear(x, qw, w_scale.cpu().numpy(), 0.125, qmin, qmax, bias.cpu().numpy())
    assert same_bits(y, expected)


@pytest.mark.parametrize("config", GEMV_CONFIGS)
@pytest.mark.parametrize("m", [1, 2, 16])
@pytest.mark.parametrize("w_bits,qmin,qmax", [(2, 0, 255), (4, -128, 127), (8, 0, 255), (3, 0, 7)])
def test_gemv_configs(config, m, w_bits, qmin, qmax):
    rng = np.random.default_rng(m * 31 + w_bits)
    direct(rng, m, 17, 200, w_bits, qmin, qmax, "gemv", config)
    direct(rng, m, 5, 3, w_bits, qmin, qmax, "gemv", config)


@pytest.mark.parametrize("config", GEMM_CONFIGS)
@pytest.mark.parametrize("m", [1, 16, 33])  # the GEMM takes any M, small ones included
@pytest.mark.parametrize("w_bits,qmin,qmax", [(2, -128, 127), (4, 0, 255), (8, 0, 255), (6, -2, 1)])
def test_gemm_configs(config, m, w_bits, qmin, qmax):
    rng = np.random.default_rng(m * 37 + w_bits)
    direct(rng, m, 17, 200, w_bits, qmin, qmax, "gemm", config, torch.bfloat16)


def test_path_checks():
    from lowbit.kernels import packed_linear as kernels

    x = torch.zeros((17, 4), device=DEVICE)
    packed = torch.zeros((3, 2), dtype=torch.uint8, device=DEVICE)
    one = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="gemv"):
        kernels.forward(x, packed, one, 4, one[:1], 0, 255, None, path="gemv")


def test_autotune_pruning():
    """The GPU autotuning configurations (not run under the interpreter): every shape keeps some, and the
    pruning reads its arguments the way triton's autotuner passes them (positional apart from keywords)."""
    from lowbit.kernels import packed_linear as kernels

    gemv, gemm = kernels._gemv_configs(), kernels._gemm_configs()
    for m, n, k in [(1, 4096, 4096), (16, 8192, 8192), (1, 5, 17), (3, 1, 1)]:
        kept = kernels._prune_gemv(gemv, {"q_ptr": None}, M=m, N=n, K=k, BLOCK_M=1 if m == 1 else 16)
        assert kept and all(c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_N"] <= 16384 for c in kept if m == 1)
    for m in (17, 64, 4096):
        kept = kernels._prune_gemm(gemm, {"q_ptr": None}, M=m, N=4096, K=4096)
        assert kept and all(c.kwargs["BLOCK_M"] <= max(32, m) for c in kept)


def test_quick_autotune_searches_a_subset(monkeypatch):
    """LOWBIT_TRITON_AUTOTUNE=quick (tools/gpu_check.sh's time-boxed benchmark) tries some of the full search's
    GEMV configurations, never others."""
    from lowbit.kernels import packed_linear as kernels

    def searched():
        return {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in kernels._gemv_configs()}

    full = searched()
    monkeypatch.setattr(kernels, "_AUTOTUNE", "quick")
    quick = searched()
    assert quick < full and len(quick) == 18
