"""lowbit.pack / unpack / packed_linear (SPEC sections 4-6) on every backend against an independent NumPy statement.

The NumPy reference below shares no code with lowbit: it packs with its own bit arithmetic, quantizes x with
float32 NumPy division and round-half-even, accumulates in int64 and applies the float32 epilogue of
lowbit/ops/packed_linear.py's contract, so every backend must match it bit for bit.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_variants, interpreted

import lowbit
from lowbit.backends import cpu as cpu_backend

CONTAINER = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
W_BITS = list(range(2, 9))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (x_bits, x_signed): 8-bit unsigned activations (0..255) do not fit int8, the others do
X_RANGES = [(8, False), (8, True), (4, False), (3, True)]
# (M, N, K): odd sizes; M > 16 takes the GEMM path, N > 64 several weight blocks, K = 4097 several K chunks
SHAPES = [(1, 1, 1), (1, 3, 17), (3, 17, 3), (17, 3, 1000), (1, 17, 4097), (3, 70, 1000), (33, 130, 4097)]
INTERPRETER_MAX_MACS = 6000  # the Triton interpreter is slow: small problems only (on a GPU, every shape in full)


# ---- the independent reference ----------------------------------------------------------------------------


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def np_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    width = CONTAINER[bits]
    per = 8 // width
    pad = (-codes.shape[-1]) % per
    fields = np.pad(codes.astype(np.int64) & ((1 << width) - 1), [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    fields = fields.reshape(*codes.shape[:-1], fields.shape[-1] // per, per)
    return sum(fields[..., i] << (width * i) for i in range(per)).astype(np.uint8)


def np_unpack(packed: np.ndarray, bits: int, k: int, signed: bool) -> np.ndarray:
    width = CONTAINER[bits]
    per = 8 // width
    fields = np.stack([(packed.astype(np.int64) >> (width * i)) & ((1 << width) - 1) for i in range(per)], -1)
    fields = fields.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :k]
    if signed:
        fields = np.where(fields >= 1 << (width - 1), fields - (1 << width), fields)
    return fields


def np_packed_linear(x, qw, w_scale, x_step, x_bits, x_signed, bias) -> torch.Tensor:
    """float32 output (before the cast to x's dtype) of the packed_linear contract."""
    xf = x.detach().float().cpu().numpy().reshape(int(np.prod(x.shape[:-1])), x.shape[-1])
    step = np.float32(x_step)
    qmin, qmax = qrange(x_bits, x_signed)
    with np.errstate(over="ignore", invalid="ignore"):  # huge x / tiny steps overflow to inf, then clamp
        q = np.clip(np.rint(xf / step), qmin, qmax)  # float32 division, half to even
    nan_rows = np.isnan(q).any(axis=1)
    q = np.where(np.isnan(q), 0, q).astype(np.int64)
    acc = q @ np.asarray(qw, dtype=np.int64).T
    y = acc.astype(np.float32) * (step * w_scale.float().cpu().numpy())
    if bias is not None:
        y = y + bias.float().cpu().numpy()
    y[nan_rows] = np.nan
    return torch.from_numpy(y.astype(np.float32)).reshape(*x.shape[:-1], qw.shape[0])


# ---- helpers ------------------------------------------------------------------------------------------------


def _interpreter_sized(backend: str, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The Triton interpreter runs kernels in NumPy, one program at a time: large shapes would take minutes, so
    under it each dimension is cut to an odd size that still crosses the kernels' tile edges. Triton on a GPU runs
    the shapes as they are."""
    if not interpreted(backend) or math.prod(shape) <= INTERPRETER_MAX_MACS:
        return shape
    m, n, k = shape
    return min(m, 17), min(n, 5), min(k, 67)


def _weights(n, k, w_bits, gen):
    lo, hi = qrange(w_bits, True)
    qw = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    w_scale = 0.01 + torch.rand(n, generator=gen) * 0.05
    return qw, w_scale


def _activations(m, k, x_bits, x_signed, gen, dtype=torch.float32):
    step = 2.0 / 2**x_bits * (0.7 + 0.6 * torch.rand(1, generator=gen).item())
    qmin, qmax = qrange(x_bits, x_signed)
    # a spread a little wider than the range, so that both clamp ends are hit
    x = (torch.rand(m, k, generator=gen) * 1.2 - 0.1) * (qmax - qmin) * step + qmin * step
    return x.to(dtype), torch.tensor([step])


def run_packed_linear(x, qw, w_scale, w_bits, x_step, x_bits, x_signed, bias=None):
    packed = lowbit.pack(qw, w_bits)
    return lowbit.packed_linear(
        x.to(DEVICE),
        packed.to(DEVICE),
        w_scale.to(DEVICE),
        w_bits,
        x_step.to(DEVICE),
        x_bits,
        x_signed=x_signed,
        bias=None if bias is None else bias.to(DEVICE),
    )


def check_packed_linear_exact(y, x, qw, w_scale, x_step, x_bits, x_signed, bias=None):
    want = np_packed_linear(x, qw.numpy(), w_scale, x_step.item(), x_bits, x_signed, bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qw.shape[0])
    torch.testing.assert_close(y.cpu(), want.to(x.dtype), rtol=0, atol=0, equal_nan=True)


# ---- pack / unpack ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 17, 1000, 4097])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", W_BITS)
def test_pack_unpack_round_trip(bits, signed, k):
    gen = torch.Generator().manual_seed(bits * 100 + k)
    lo, hi = qrange(bits, signed)
    dtype = torch.int8 if signed else torch.uint8
    codes = torch.randint(lo, hi + 1, (2, 3, k), generator=gen, dtype=torch.int16).to(dtype)
    codes[0, 0, :2] = torch.tensor([lo, hi], dtype=dtype)[: min(2, k)]  # both ends of the range
    packed = lowbit.pack(codes.to(DEVICE), bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, -(-k // (8 // CONTAINER[bits])))
    np.testing.assert_array_equal(packed.cpu().numpy(), np_pack(codes.numpy(), bits))
    back = lowbit.unpack(packed, bits, k, signed=signed)
    assert back.dtype == dtype
    torch.testing.assert_close(back.cpu(), codes, rtol=0, atol=0)
    np.testing.assert_array_equal(back.cpu().numpy().astype(np.int64), np_unpack(packed.cpu().numpy(), bits, k, signed))


def test_pack_layout_is_low_bits_first():
    codes = torch.tensor([[1, -1, 0, -2]], dtype=torch.int8)
    assert lowbit.pack(codes, 2).tolist() == [[0b10_00_11_01]]
    assert lowbit.pack(codes, 4).tolist() == [[0xF1, 0xE0]]
    assert lowbit.pack(codes, 8).tolist() == [[1, 255, 0, 254]]
    assert lowbit.pack(torch.tensor([[1, -4, 3]], dtype=torch.int8), 3).tolist() == [[0xC1, 0x03]]  # 4-bit fields
    assert lowbit.pack(torch.tensor([[3, 0, 2, 1]], dtype=torch.uint8), 2).tolist() == [[0b01_10_00_11]]


def test_pack_pads_with_zero_codes():
    codes = torch.full((1, 5), -1, dtype=torch.int8)
    assert lowbit.pack(codes, 2).tolist() == [[0xFF, 0x03]]
    assert lowbit.pack(codes, 4).tolist() == [[0xFF, 0xFF, 0x0F]]


def test_pack_unpack_noncontiguous_and_empty():
    codes = torch.randint(-8, 8, (5, 9), dtype=torch.int8).t()  # (9, 5), not contiguous
    torch.testing.assert_close(lowbit.unpack(lowbit.pack(codes, 4), 4, 5), codes, rtol=0, atol=0)
    assert lowbit.pack(torch.zeros(0, 7, dtype=torch.int8), 4).shape == (0, 4)
    assert lowbit.pack(torch.zeros(3, 0, dtype=torch.int8), 2).shape == (3, 0)
    assert lowbit.unpack(torch.zeros(3, 0, dtype=torch.uint8), 2, 0).shape == (3, 0)


# ---- packed_linear: bit-exact against the NumPy statement ------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("x_range", X_RANGES, ids=lambda r: f"a{r[0]}{'s' if r[1] else 'u'}")
@pytest.mark.parametrize("w_bits", W_BITS, ids=lambda b: f"w{b}")
def test_packed_linear_matches_reference(backend, w_bits, x_range, shape):
    m, n, k = _interpreter_sized(backend, shape)
    x_bits, x_signed = x_range
    gen = torch.Generator().manual_seed(hash((w_bits, x_range, shape)) % 2**31)
    qw, w_scale = _weights(n, k, w_bits, gen)
    x, x_step = _activations(m, k, x_bits, x_signed, gen)
    bias = torch.randn(n, generator=gen) if (w_bits + m) % 2 else None
    y = run_packed_linear(x, qw, w_scale, w_bits, x_step, x_bits, x_signed, bias)
    check_packed_linear_exact(y, x, qw, w_scale, x_step, x_bits, x_signed, bias)


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("w_bits", [2, 4, 8], ids=lambda b: f"w{b}")
def test_packed_linear_dtypes(backend, w_bits, dtype, with_bias):
    m, n, k = (5, 7, 130) if interpreted(backend) else (19, 37, 301)
    gen = torch.Generator().manual_seed(w_bits + 10 * DTYPES.index(dtype))
    qw, w_scale = _weights(n, k, w_bits, gen)
    x, x_step = _activations(m, k, 8, True, gen, dtype)
    bias = torch.randn(n, generator=gen) if with_bias else None
    y = run_packed_linear(x, qw, w_scale, w_bits, x_step, 8, True, bias)
    check_packed_linear_exact(y, x, qw, w_scale, x_step, 8, True, bias)


@pytest.mark.parametrize("x_signed", [False, True], ids=["unsigned", "signed"])
def test_ties_clamp_edges_inf_and_nan_rows(backend, x_signed):
    x_bits, step = 4, 0.25  # a power of two: every half step below is exact, so the ties are real ties
    qmin, qmax = qrange(x_bits, x_signed)
    ties = torch.arange(qmin - 3, qmax + 3, dtype=torch.float32) + 0.5  # x / step = k + 0.5 for every k
    k = ties.numel()
    rows = [
        ties * step,
        -ties * step,
        torch.full((k,), float("inf")),
        torch.full((k,), -float("inf")),
        torch.where(torch.arange(k) % 2 == 0, 1e30, -1e30),  # far past both clamp ends
        (torch.arange(k) % 3 - 1) * 3.4e38,
        ties * step,
    ]
    x = torch.stack(rows)
    x[1, 3] = float("nan")  # one NaN poisons its whole row only
    x[6, -1] = float("nan")
    gen = torch.Generator().manual_seed(3)
    for w_bits in (2, 4, 8):
        qw, w_scale = _weights(9, k, w_bits, gen)
        bias = torch.randn(9, generator=gen)
        y = run_packed_linear(x, qw, w_scale, w_bits, torch.tensor([step]), x_bits, x_signed, bias)
        check_packed_linear_exact(y, x, qw, w_scale, torch.tensor([step]), x_bits, x_signed, bias)
        assert torch.isnan(y[[1, 6]]).all() and not torch.isnan(y[[0, 2, 3, 4, 5]]).any()


def test_extreme_codes(backend):
    """Every product at its extreme (x = 255 or -128 against w = -128 / 127) for all K steps of a long row."""
    k = 700 if interpreted(backend) else 4097
    for x_bits, x_signed, value in [(8, False, 1e9), (8, True, -1e9), (8, True, 1e9)]:
        x = torch.full((2, k), value)
        qw = torch.full((3, k), -128, dtype=torch.int8)
        qw[1] = 127
        qw[2, ::2] = 127
        w_scale = torch.tensor([1.0, 0.5, 0.25])
        y = run_packed_linear(x, qw, w_scale, 8, torch.tensor([1.0]), x_bits, x_signed)
        check_packed_linear_exact(y, x, qw, w_scale, torch.tensor([1.0]), x_bits, x_signed)


@pytest.mark.parametrize("shape", [(0, 5, 7), (3, 0, 7), (3, 5, 0), (0, 0, 0)], ids=["M0", "N0", "K0", "all0"])
def test_empty(backend, shape):
    m, n, k = shape
    gen = torch.Generator().manual_seed(0)
    qw, w_scale = _weights(n, k, 4, gen)
    x, x_step = _activations(m, k, 8, True, gen)
    bias = torch.randn(n, generator=gen)
    y = run_packed_linear(x, qw, w_scale, 4, x_step, 8, True, bias)
    check_packed_linear_exact(y, x, qw, w_scale, x_step, 8, True, bias)  # K = 0: y is the bias
    y3 = run_packed_linear(x.reshape(1, m, k), qw, w_scale, 4, x_step, 8, True)
    assert y3.shape == (1, m, n)


def test_noncontiguous_and_batched_x(backend):
    gen = torch.Generator().manual_seed(5)
    qw, w_scale = _weights(6, 33, 4, gen)
    x, x_step = _activations(33, 10, 8, False, gen)
    xt = x.t()  # (10, 33) view, not contiguous
    assert not xt.is_contiguous()
    check_packed_linear_exact(
        run_packed_linear(xt, qw, w_scale, 4, x_step, 8, False), xt, qw, w_scale, x_step, 8, False
    )
    xb, _ = _activations(2 * 3, 66, 8, False, gen)
    xs = xb.reshape(2, 3, 66)[..., ::2]  # (2, 3, 33) strided
    check_packed_linear_exact(
        run_packed_linear(xs, qw, w_scale, 4, x_step, 8, False), xs, qw, w_scale, x_step, 8, False
    )


def test_result_independent_of_thread_count():
    gen = torch.Generator().manual_seed(9)
    qw, w_scale = _weights(200, 1000, 4, gen)
    x, x_step = _activations(70, 1000, 8, True, gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_packed_linear(x, qw, w_scale, 4, x_step, 8, True)
        torch.set_num_threads(max(2, before))
        many = run_packed_linear(x, qw, w_scale, 4, x_step, 8, True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, many, rtol=0, atol=0)


@pytest.mark.parametrize("w_bits", [2, 3, 4, 8], ids=lambda b: f"w{b}")
def test_matches_fake_quant_linear_within_spec(backend, w_bits):
    """SPEC section 4: F.linear(fake_quant(x), dequant(W)) + bias to float32 rounding (relative 1e-5)."""
    m, n, k = (3, 5, 64) if interpreted(backend) else (17, 33, 4097)
    gen = torch.Generator().manual_seed(w_bits)
    qw, w_scale = _weights(n, k, w_bits, gen)
    x, x_step = _activations(m, k, 8, True, gen)
    bias = torch.randn(n, generator=gen)
    y = run_packed_linear(x, qw, w_scale, w_bits, x_step, 8, True, bias).cpu()
    with lowbit.use_backend("reference"):
        fq = lowbit.fake_quant(x, x_step, 8, signed=True)
    dq = qw.float() * w_scale[:, None]
    want = F.linear(fq.double(), dq.double(), bias.double())
    scale = F.linear(fq.double().abs(), dq.double().abs(), bias.double().abs())  # the sum of |terms|
    assert ((y.double() - want).abs() <= 1e-5 * scale).all()


# ---- torch.library integration ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_opcheck_packed_linear(backend, with_bias):
    gen = torch.Generator().manual_seed(2)
    qw, w_scale = _weights(5, 13, 4, gen)
    x, x_step = _activations(3, 13, 8, False, gen)
    bias = torch.randn(5, generator=gen).to(DEVICE) if with_bias else None
    args = (x.to(DEVICE), lowbit.pack(qw, 4).to(DEVICE), w_scale.to(DEVICE), 4, x_step.to(DEVICE), 8, False, bias)
    torch.library.opcheck(torch.ops.lowbit.packed_linear.default, args)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_opcheck_pack_unpack(bits):
    codes = torch.randint(*qrange(bits, True), (4, 11), dtype=torch.int8).to(DEVICE)
    torch.library.opcheck(torch.ops.lowbit.pack.default, (codes, bits))
    packed = lowbit.pack(codes, bits)
    torch.library.opcheck(torch.ops.lowbit.unpack.default, (packed, bits, 11, True))
    torch.library.opcheck(torch.ops.lowbit.unpack.default, (packed, bits, 11, False))


def test_compile_fullgraph():
    gen = torch.Generator().manual_seed(4)
    qw, w_scale = _weights(24, 40, 4, gen)
    packed, w_scale = lowbit.pack(qw, 4).to(DEVICE), w_scale.to(DEVICE)
    x_step, bias = torch.tensor([0.05], device=DEVICE), torch.randn(24, generator=gen).to(DEVICE)

    def layer(x):
        return torch.relu(lowbit.packed_linear(x, packed, w_scale, 4, x_step, 8, x_signed=True, bias=bias)) * 2

    x = torch.randn(2, 3, 40, generator=gen).to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


# ---- bad input (SPEC section 6) -------------------------------------------------------------------------


def _good():
    qw = torch.randint(-8, 8, (4, 10), dtype=torch.int8)
    return dict(
        x=torch.randn(3, 10),
        packed_w=lowbit.pack(qw, 4),
        w_scale=torch.full((4,), 0.1),
        w_bits=4,
        x_step=torch.tensor([0.1]),
        x_bits=8,
    )


def _call(**overrides):
    args = {**_good(), **overrides}
    kw = {k: args.pop(k) for k in ("x_signed", "bias") if k in args}
    return lowbit.packed_linear(*args.values(), **kw)


@pytest.mark.parametrize(
    ("overrides", "error", "name"),
    [
        (dict(x=torch.ones(3, 10, dtype=torch.int32)), TypeError, "x"),
        (dict(x=[1.0] * 10), TypeError, "x"),
        (dict(x=torch.tensor(1.0)), ValueError, "x"),
        (dict(x=torch.randn(3, 11)), ValueError, "packed_w"),
        (dict(packed_w=torch.zeros(4, 5, dtype=torch.int8)), TypeError, "packed_w"),
        (dict(packed_w=torch.zeros(4, 5, 1, dtype=torch.uint8)), TypeError, "packed_w"),
        (dict(packed_w=torch.zeros(4, 6, dtype=torch.uint8)), ValueError, "packed_w"),
        (dict(packed_w="weights"), TypeError, "packed_w"),
        (dict(w_scale=torch.ones(4, dtype=torch.int64)), TypeError, "w_scale"),
        (dict(w_scale=torch.ones(5)), ValueError, "w_scale"),
        (dict(w_scale=torch.tensor([0.1, 0.0, 0.1, 0.1])), ValueError, "w_scale"),
        (dict(w_scale=torch.tensor([0.1, -1.0, 0.1, 0.1])), ValueError, "w_scale"),
        (dict(w_scale=torch.tensor([0.1, float("nan"), 0.1, 0.1])), ValueError, "w_scale"),
        (dict(w_scale=torch.tensor([0.1, float("inf"), 0.1, 0.1])), ValueError, "w_scale"),
        (dict(w_bits=1), ValueError, "w_bits"),
        (dict(w_bits=9), ValueError, "w_bits"),
        (dict(w_bits=4.0), TypeError, "w_bits"),
        (dict(w_bits=True), TypeError, "w_bits"),
        (dict(x_bits=1), ValueError, "x_bits"),
        (dict(x_bits="8"), TypeError, "x_bits"),
        (dict(x_step=0.1), TypeError, "x_step"),
        (dict(x_step=torch.tensor([0.1, 0.2])), ValueError, "x_step"),
        (dict(x_step=torch.tensor([0.0])), ValueError, "x_step"),
        (dict(x_step=torch.tensor([-0.1])), ValueError, "x_step"),
        (dict(x_step=torch.tensor([float("inf")])), ValueError, "x_step"),
        (dict(x_step=torch.tensor([float("nan")])), ValueError, "x_step"),
        (dict(x_step=torch.tensor([1], dtype=torch.int32)), TypeError, "x_step"),
        (dict(x_signed=1), TypeError, "x_signed"),
        (dict(bias=torch.ones(5)), ValueError, "bias"),
        (dict(bias=torch.ones(4, dtype=torch.int32)), TypeError, "bias"),
        (dict(bias=[0.0] * 4), TypeError, "bias"),
    ],
    ids=lambda v: None if isinstance(v, dict) else "",
)
def test_packed_linear_bad_input(backend, overrides, error, name):
    with pytest.raises(error, match=name):
        _call(**overrides)


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: lowbit.pack([1, 2], 4), TypeError, "codes"),
        (lambda: lowbit.pack(torch.ones(4), 4), TypeError, "codes"),
        (lambda: lowbit.pack(torch.ones(4, dtype=torch.int32), 4), TypeError, "codes"),
        (lambda: lowbit.pack(torch.tensor(1, dtype=torch.int8), 4), ValueError, "codes"),
        (lambda: lowbit.pack(torch.tensor([8], dtype=torch.int8), 4), ValueError, "codes"),
        (lambda: lowbit.pack(torch.tensor([-9], dtype=torch.int8), 4), ValueError, "codes"),
        (lambda: lowbit.pack(torch.tensor([16], dtype=torch.uint8), 4), ValueError, "codes"),
        (lambda: lowbit.pack(torch.tensor([2], dtype=torch.int8), 2), ValueError, "codes"),
        (lambda: lowbit.pack(torch.zeros(4, dtype=torch.int8), 1), ValueError, "bits"),
        (lambda: lowbit.pack(torch.zeros(4, dtype=torch.int8), 9), ValueError, "bits"),
        (lambda: lowbit.pack(torch.zeros(4, dtype=torch.int8), 4.0), TypeError, "bits"),
        (lambda: lowbit.unpack([1], 4, 2), TypeError, "packed"),
        (lambda: lowbit.unpack(torch.zeros(2, dtype=torch.int8), 4, 4), TypeError, "packed"),
        (lambda: lowbit.unpack(torch.tensor(1, dtype=torch.uint8), 4, 2), ValueError, "packed"),
        (lambda: lowbit.unpack(torch.zeros(2, dtype=torch.uint8), 0, 4), ValueError, "bits"),
        (lambda: lowbit.unpack(torch.zeros(2, dtype=torch.uint8), 4, 5), ValueError, "k"),
        (lambda: lowbit.unpack(torch.zeros(2, dtype=torch.uint8), 4, 2), ValueError, "k"),
        (lambda: lowbit.unpack(torch.zeros(2, dtype=torch.uint8), 4, -1), ValueError, "k"),
        (lambda: lowbit.unpack(torch.zeros(2, dtype=torch.uint8), 4, 4.0), TypeError, "k"),
        (lambda: lowbit.unpack(torch.zeros(2, dtype=torch.uint8), 4, True), TypeError, "k"),
        (lambda: lowbit.unpack(torch.zeros(2, dtype=torch.uint8), 4, 4, signed=1), TypeError, "signed"),
    ],
)
def test_pack_unpack_bad_input(call, error, name):
    with pytest.raises(error, match=name):
        call()


# ---- CPU code paths: which kernels ran --------------------------------------------------------------------
# Results agree across paths by construction of the tests above, so agreement alone cannot show that the AMX or
# VNNI tiles ran. The extension counts packed_linear calls per path (lowbit.backends.cpu.packed_path_counts) and
# reports the optional features it uses (lowbit.backends.cpu.features); these tests check both against the CPU.

CPU_VARIANTS = [v for v in backend_variants() if v.startswith("cpu-")]
ISA_ORDER = ["scalar", "avx2", "avx512"]
GEMM_ROWS = 33  # more than the driver's 16 GEMV rows, and one whole 32-row AMX block


def cpuinfo_flags() -> set[str] | None:
    """The CPU flags Linux reports, an account of the CPU that shares nothing with lowbit; None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((row for row in f if row.startswith("flags")), None)
    except OSError:
        return None
    return None if line is None else set(line.split(":", 1)[1].split())


def amx_permitted() -> bool:
    """Linux grants this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)."""
    import ctypes
    import platform

    if platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    sys_arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
    return libc.syscall(sys_arch_prctl, req_xcomp_perm, xtiledata) == 0


def expected_packed_path(isa: str, m: int) -> str:
    """The path packed_linear must take at ISA level `isa` for M = m (csrc/cpu/packed_linear.h)."""
    if isa != "avx512":
        return isa
    features = cpu_backend.features()
    if "amx_int8" in features and m > 16:
        return "amx"
    return "vnni" if "avx512_vnni" in features else "avx2"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU code paths")
@pytest.mark.parametrize("m", [1, GEMM_ROWS], ids=["gemv", "gemm"])
@pytest.mark.parametrize("backend", CPU_VARIANTS, indirect=True)
def test_packed_linear_runs_the_expected_cpu_path(backend, m):
    isa = backend.removeprefix("cpu-")
    gen = torch.Generator().manual_seed(m)
    qw, w_scale = _weights(130, 301, 4, gen)
    x, x_step = _activations(m, 301, 8, True, gen)
    before = cpu_backend.packed_path_counts()
    y = run_packed_linear(x, qw, w_scale, 4, x_step, 8, True)
    after = cpu_backend.packed_path_counts()
    ran = {path: after[path] - before[path] for path in after}
    assert ran == {path: int(path == expected_packed_path(isa, m)) for path in after}
    check_packed_linear_exact(y, x, qw, w_scale, x_step, 8, True)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU code paths")
@pytest.mark.skipif(cpuinfo_flags() is None, reason="no /proc/cpuinfo to compare against (not Linux)")
def test_cpu_isa_and_features_match_the_cpu():
    """The ISA level and optional features lowbit uses are the best this CPU has, less the LOWBIT_CPU_* caps."""
    flags = cpuinfo_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        best = "avx512"
    elif {"avx2", "fma", "f16c"} <= flags:
        best = "avx2"
    else:
        best = "scalar"
    cap = os.environ.get("LOWBIT_CPU_ISA", best)
    best = ISA_ORDER[min(ISA_ORDER.index(best), ISA_ORDER.index(cap))]
    assert cpu_backend.supported_isas() == ISA_ORDER[: ISA_ORDER.index(best) + 1][::-1]
    want = []
    if best == "avx512" and "avx512_vnni" in flags and os.environ.get("LOWBIT_CPU_VNNI") != "0":
        want.append("avx512_vnni")
        if {"amx_tile", "amx_int8"} <= flags and os.environ.get("LOWBIT_CPU_AMX") != "0" and amx_permitted():
            want.append("amx_int8")
    assert cpu_backend.features() == want


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU code paths")
def test_lowbit_cpu_isa_caps_the_whole_process():
    """LOWBIT_CPU_ISA=scalar reproduces a CPU without AVX2 on any machine: one level, no features, scalar tiles."""
    code = (
        "import torch, lowbit; from lowbit.backends import status, cpu\n"
        "assert status('cpu').available, status('cpu').reason  # loads the extension\n"
        "assert cpu.isa() == 'scalar' and cpu.supported_isas() == ['scalar'], cpu.supported_isas()\n"
        "assert cpu.features() == [], cpu.features()\n"
        "x, w = torch.randn(40, 20), lowbit.pack(torch.ones(9, 20, dtype=torch.int8), 4)\n"
        "lowbit.packed_linear(x, w, torch.ones(9), 4, torch.tensor([0.1]), 8, x_signed=True)\n"
        "counts = cpu.packed_path_counts()\n"
        "assert counts == {'scalar': 1, 'avx2': 0, 'vnni': 0, 'amx': 0, 'panel': 0}, counts\n"
    )
    env = {**os.environ, "LOWBIT_CPU_ISA": "scalar", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU kernel switches")
@pytest.mark.parametrize(("switch", "feature"), [("LOWBIT_CPU_AMX", "amx_int8"), ("LOWBIT_CPU_VNNI", "avx512_vnni")])
def test_cpu_paths_without_amx_or_vnni(switch, feature):
    """The AVX-512 level runs AMX tiles for GEMM blocks when the CPU has them, else VNNI, else AVX2 tiles; the
    in-process runs above cover only the best path, so run the GEMM-shaped cases and the path check again in a
    process with `feature` switched off, where the path check proves that the next path down ran."""
    if feature not in cpu_backend.features():
        pytest.skip(f"this CPU has no {feature} (or it is off here): {switch}=0 would change nothing")
    env = {**os.environ, switch: "0", "OMP_NUM_THREADS": "1"}
    select = "(cpu-avx512 and (33x130 or expected_cpu_path)) or match_the_cpu"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__, "-k", select]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, output
    summary = done.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary, output
