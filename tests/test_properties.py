"""Property tests (hypothesis): random shapes, strides, dtypes, steps from 1e-8 to 1e4, offsets, bits and branch
counts, with inf and NaN in x, for every backend against the independent reference; pack/unpack and packed_linear
against the NumPy statement of tests/test_packed_linear.py. Derandomized (fixed seed),
so a failure reproduces. ``max_examples`` is only a ceiling in hypothesis (it stops early when its search space
runs dry or too many draws are rejected), so each property counts the examples that ran to the end and fails
unless at least 200 did, per op and backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fake_quant import check_fake_quant
from test_multi_branch_fake_quant import check_multi_branch
from test_packed_linear import check_packed_linear_exact, np_pack, run_packed_linear

import lowbit
from lowbit import quant_range

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXAMPLES = 200
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def examples(request):
    """A counter the property bumps at the end of each example; fewer than EXAMPLES valid ones fail the test."""
    count = [0]
    yield count
    assert count[0] >= EXAMPLES, f"{request.node.name} ran {count[0]} valid examples, the docs promise {EXAMPLES}"


@st.composite
def tensors(draw, max_dims=4, max_side=9):
    """A float tensor (maybe a strided view) with specials, plus its generator seed."""
    shape = draw(st.lists(st.integers(0, max_side), min_size=0, max_size=max_dims))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = 10 ** draw(st.floats(-3, 3))
    base = torch.randn([s * 2 if i == 0 else s for i, s in enumerate(shape)] or [], generator=gen) * scale
    if base.numel() and draw(st.booleans()):
        flat = base.view(-1)
        flat[torch.randint(0, flat.numel(), (3,), generator=gen)] = torch.tensor([math.inf, -math.inf, math.nan])
    x = base[::2] if shape else base  # every other row: a non-contiguous view
    return x.to(DEVICE, dtype), seed


@given(data=st.data(), xs=tensors())
@SETTINGS
def test_fake_quant_property(examples, backend, data, xs):
    x, seed = xs
    bits = data.draw(st.integers(2, 8))
    signed = data.draw(st.booleans())
    per_channel = x.dim() > 0 and data.draw(st.booleans())
    axis = data.draw(st.integers(-x.dim(), x.dim() - 1)) if per_channel else None
    channels = x.shape[axis] if per_channel else 1
    log_steps = data.draw(st.lists(st.floats(-8, 4), min_size=channels, max_size=channels))
    step = torch.tensor([10.0**e for e in log_steps], dtype=torch.float32, device=DEVICE)
    offset = None
    if data.draw(st.booleans()):
        offset = torch.tensor(
            data.draw(st.lists(st.floats(-2, 2), min_size=channels, max_size=channels)),
            dtype=torch.float32,
            device=DEVICE,
        )
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, x.dtype)
    check_fake_quant(x, step, bits, signed, offset=offset, axis=axis, grad=grad)
    examples[0] += 1


@given(data=st.data(), xs=tensors())
@SETTINGS
def test_multi_branch_property(examples, backend, data, xs):
    x, seed = xs
    bits = data.draw(st.lists(st.integers(2, 8), min_size=1, max_size=7, unique=True))
    signed = data.draw(st.booleans())
    steps = torch.tensor([10.0 ** data.draw(st.floats(-8, 4)) for _ in bits], device=DEVICE)
    probs = torch.tensor(data.draw(st.lists(st.floats(0, 1), min_size=len(bits), max_size=len(bits))), device=DEVICE)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, x.dtype)
    check_multi_branch(x, steps, probs, bits, signed, grad)
    examples[0] += 1


# ---- packed storage and the packed GEMM --------------------------------------------------------------------


@given(data=st.data())
@SETTINGS
def test_pack_unpack_property(examples, data):
    bits = data.draw(st.integers(2, 8))
    signed = data.draw(st.booleans())
    shape = data.draw(st.lists(st.integers(0, 7), min_size=1, max_size=3))
    lo, hi = quant_range(bits, signed)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    codes = torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int16).to(torch.int8 if signed else torch.uint8)
    packed = lowbit.pack(codes.to(DEVICE), bits)
    np.testing.assert_array_equal(packed.cpu().numpy(), np_pack(codes.numpy(), bits))
    back = lowbit.unpack(packed, bits, shape[-1], signed=signed)
    assert torch.equal(back.cpu(), codes)
    examples[0] += 1


@given(data=st.data())
@SETTINGS
def test_packed_linear_property(examples, backend, data):
    """Random M, N, K (0 included), widths, activation ranges, dtypes, steps 1e-8..1e4, inf/NaN, strided x:
    every backend equals the independent NumPy statement bit for bit."""
    m, n, k = data.draw(st.integers(0, 9)), data.draw(st.integers(0, 9)), data.draw(st.integers(0, 70))
    w_bits, x_bits = data.draw(st.integers(2, 8)), data.draw(st.integers(2, 8))
    x_signed = data.draw(st.booleans())
    dtype = data.draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    lo, hi = quant_range(w_bits, True)
    qw = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    w_scale = torch.tensor([10.0 ** data.draw(st.floats(-8, 4)) for _ in range(n)])
    x_step = torch.tensor([10.0 ** data.draw(st.floats(-8, 4))])
    x = (torch.randn(m, 2 * k, generator=gen) * x_step * 2 ** (x_bits - 1) * 1.5)[:, ::2]  # strided view
    if x.numel() and data.draw(st.booleans()):
        x.view(-1)[torch.randint(0, x.numel(), (3,), generator=gen)] = torch.tensor([math.inf, -math.inf, math.nan])
    x = x.to(dtype)
    bias = torch.randn(n, generator=gen) if data.draw(st.booleans()) else None
    y = run_packed_linear(x, qw, w_scale, w_bits, x_step, x_bits, x_signed, bias)
    check_packed_linear_exact(y, x, qw, w_scale, x_step, x_bits, x_signed, bias)
    examples[0] += 1
