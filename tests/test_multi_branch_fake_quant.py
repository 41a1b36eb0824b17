"""lowbit.multi_branch_fake_quant on every backend against the independent NumPy reference (SPEC section 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from conftest import DEVICE, backend_variants, interpreted
from test_fake_quant import DTYPES, close_sum
from test_fold import CLIPS, EDGES
from torch import nn

import lowbit

BRANCHES = [(4,), (2, 4, 8), (8, 2), (3, 5), (2, 3, 4, 5, 6, 7, 8)]
SHAPES = [(0,), (1,), (7,), (1023,), (3, 5, 7, 11), (100_003,)]
PROBS = {
    "softmax": lambda n, gen: torch.softmax(torch.randn(n, generator=gen), 0),
    "unnormalised": lambda n, gen: 0.2 + torch.rand(n, generator=gen) * 2,
    "with-zeros": lambda n, gen: torch.tensor([0.0 if i % 2 else 1.0 / (i + 1) for i in range(n)]),
}


def _inputs(shape, bits, signed, dtype, probs_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 1.5 + (0.0 if signed else 1.0)
    steps = torch.tensor([3.0 / 2**b * (0.7 + 0.6 * torch.rand(1, generator=gen).item()) for b in bits])
    probs = PROBS[probs_kind](len(bits), gen)
    grad = torch.randn(shape, generator=gen)
    return x.to(DEVICE, dtype), steps.to(DEVICE), probs.to(DEVICE), grad.to(DEVICE, dtype)


def check_multi_branch(x, steps, probs, bits, signed, grad, grad_scale=None, cancel_allowance=True):
    x, steps, probs = (t.detach().requires_grad_(True) for t in (x, steps, probs))
    y = lowbit.multi_branch_fake_quant(x, steps, probs, bits, signed=signed, grad_scale=grad_scale)
    y.backward(grad)
    scales = [grad_scale] * len(bits) if isinstance(grad_scale, float) else grad_scale
    want = ref.multi_branch(x, steps, probs, bits, signed, grad=grad, grad_scale=scales)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.cpu(), ref.to_dtype(want.y, x.dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x.grad.cpu(), ref.to_dtype(want.dx, x.dtype), rtol=0, atol=0, equal_nan=True)
    close_sum(steps.grad, want.dsteps, want.dsteps_scale, "dsteps", cancel_allowance)
    close_sum(probs.grad, want.dprobs, want.dprobs_scale, "dprobs", cancel_allowance)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bits", BRANCHES, ids=lambda b: "b" + "-".join(map(str, b)))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, shape, bits, dtype):
    # signedness and the kind of probabilities rotate over the grid, so each meets every shape and branch set
    index = SHAPES.index(shape) + BRANCHES.index(bits) + DTYPES.index(dtype)
    signed, probs_kind = bool(index % 2), list(PROBS)[index % len(PROBS)]
    seed = hash((shape, bits, signed)) % 2**31
    x, steps, probs, grad = _inputs(shape, bits, signed, dtype, probs_kind, seed)
    check_multi_branch(x, steps, probs, list(bits), signed, grad)


def test_edge_values_and_nan(backend):
    bits = [2, 4, 8]
    x = torch.tensor([0.0625 * k for k in range(-40, 41)] + [float("nan"), float("inf"), -float("inf"), 1e30])
    steps = torch.tensor([0.5, 0.125, 0.0625])  # powers of two: ties and clamp edges are exact
    probs = torch.tensor([0.25, 0.5, 0.25])
    grad = torch.linspace(-1, 1, x.numel())
    check_multi_branch(x.to(DEVICE), steps.to(DEVICE), probs.to(DEVICE), bits, True, grad.to(DEVICE))
    y = lowbit.multi_branch_fake_quant(x.to(DEVICE), steps.to(DEVICE), probs.to(DEVICE), bits, signed=True)
    assert torch.isnan(y[-4]).item()


def test_per_branch_grad_scale_and_non_contiguous(backend):
    x, steps, probs, grad = _inputs((40, 30), (2, 4), True, torch.float32, "unnormalised", seed=1)
    check_multi_branch(x.t(), steps, probs, [2, 4], True, grad.t(), grad_scale=[0.1, 0.02])


def test_one_branch_with_probability_one_is_fake_quant(backend):
    x = torch.randn(3, 50, device=DEVICE)
    step = torch.tensor([0.07], device=DEVICE)
    y = lowbit.multi_branch_fake_quant(x, step, torch.ones(1, device=DEVICE), [4], signed=True)
    torch.testing.assert_close(y, lowbit.fake_quant(x, step, 4, signed=True), rtol=0, atol=0)


def large_sum_variants() -> list[str]:
    """The fused kernels that split long sums into partial sums: one C++ instruction set (AVX-512 where the CPU has
    it), and Triton and CUDA on a GPU (not Triton in the interpreter, too slow at this size)."""
    variants = backend_variants()
    cpu = [v for v in variants if v == "cpu-avx512"] or [v for v in variants if v.startswith("cpu")][:1]
    return cpu + [v for v in variants if v in ("triton", "cuda") and not interpreted(v)]


@pytest.mark.parametrize("backend", large_sum_variants(), indirect=True)
def test_large_sums_stay_accurate(backend):
    """Millions of terms per branch: SPEC's relative 1e-4 as written, no allowance for cancellation (measured on
    AVX2: 1.3e-7)."""
    x, steps, probs, grad = _inputs((8, 32, 56, 56), (2, 4, 8), False, torch.float32, "softmax", seed=2)
    check_multi_branch(x, steps, probs, [2, 4, 8], False, grad, cancel_allowance=False)


# ---- the folded clip (a ReLU / ReLU6 in front of MetaMix's mixture, lowbit.fold_activation_clips) -------------


@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(3, 5, 7, 11), (1023,)], ids=lambda s: "x".join(map(str, s)))
def test_clip_matches_hardtanh_then_the_mixture(backend, clip, dtype, shape):
    """NumPy reference: the mixture of hardtanh(x); dx as torch's hardtanh backward gives it (passed on inside
    the open interval, zero elsewhere and for NaN)."""
    bits, signed = [2, 4, 8], clip[0] < 0
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=gen) * 4).to(dtype)
    x.view(-1)[: len(EDGES)] = torch.tensor(EDGES).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    steps = torch.tensor([0.4, 0.11, 0.017])
    probs = torch.softmax(torch.randn(3, generator=gen), 0)
    xs, ss, ps = (t.to(DEVICE).requires_grad_(True) for t in (x, steps, probs))
    y = lowbit.multi_branch_fake_quant(xs, ss, ps, bits, signed=signed, clip=clip)
    y.backward(grad.to(DEVICE))

    lo, hi = clip
    xn = ref.as_np(x)
    with np.errstate(invalid="ignore"):
        clipped = torch.from_numpy(np.clip(xn, lo, hi)).to(dtype)  # exact in x's dtype: the bounds are
        want = ref.multi_branch(clipped, steps, probs, bits, signed, grad=grad)
        want.dx = np.where((xn > lo) & (xn < hi), want.dx, 0.0)
    torch.testing.assert_close(y.cpu(), ref.to_dtype(want.y, dtype), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(xs.grad.cpu(), ref.to_dtype(want.dx, dtype), rtol=0, atol=0, equal_nan=True)
    close_sum(ss.grad, want.dsteps, want.dsteps_scale, "dsteps")
    close_sum(ps.grad, want.dprobs, want.dprobs_scale, "dprobs")


def test_clip_equals_hardtanh_then_the_op_bit_for_bit(backend):
    """The folded clip and hardtanh + the op give the same bits, signed zeros and gradients included (same
    backend, same sums): what makes a folded MetaMix model train exactly like the unfolded one."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 8, 9, 9, generator=gen) * 4
    x.view(-1)[: len(EDGES)] = torch.tensor(EDGES)
    g = torch.randn(x.shape, generator=gen)
    g.view(-1)[: len(EDGES)] = -1.0  # negative: where the mixture's dx is -0.0, hardtanh's backward decides the sign
    outs = []
    for folded in (True, False):
        xi = x.clone().to(DEVICE).requires_grad_(True)
        steps = torch.tensor([0.3, 0.05], device=DEVICE, requires_grad=True)
        probs = torch.tensor([0.6, 0.4], device=DEVICE, requires_grad=True)
        xq = xi if folded else nn.functional.hardtanh(xi, 0.0, 6.0)
        y = lowbit.multi_branch_fake_quant(xq, steps, probs, [3, 6], clip=(0.0, 6.0) if folded else None)
        y.backward(g.to(DEVICE))
        outs.append([t.detach().cpu().view(torch.int32) for t in (y, xi.grad, steps.grad, probs.grad)])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "clip, error",
    [((0.0,), TypeError), ((0.0, "6"), TypeError), ((6.0, 0.0), ValueError), ((math.nan, 6.0), ValueError)],
)
def test_bad_clip_is_rejected_naming_it(clip, error):
    with pytest.raises(error, match="clip"):
        lowbit.multi_branch_fake_quant(torch.randn(4), torch.tensor([0.1, 0.2]), torch.ones(2), [2, 4], clip=clip)
