"""SPEC section 4's bound: packed_linear matches F.linear(fake_quant(x), dequant(W)) + bias "to float32 rounding
(relative error under 1e-5 for K up to 8192)", on every backend, against that expression evaluated exactly
(float64 holds every product and sum here without rounding).

Read as written, per element, the bound holds where fake_quant(x) and dequant(W) are exact, i.e. with power-of-two
steps: then the two sides differ only by the packed epilogue's roundings (measured: at most 6e-8 relative). With
other steps each fake-quant value q * s is itself rounded to float32 (unit roundoff u = 2^-24) while the integer path
scales the exact sum once, so the two differ by up to 2u * sum|terms|: relative to one output that cancels to ~0 this
is unbounded (measured up to 1.0 at K = 64). There the bound is read norm-wise, per output row (docs/decisions.md):
||y_m - want_m||_2 <= 1e-5 ||want_m||_2 (measured at most 2.1e-7). The bit-exact agreement of every backend with the
integer statement is tested in tests/test_packed_linear.py.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import lowbit

SPEC_RTOL = 1e-5
K_VALUES = [1, 64, 4097, 8192]  # up to SPEC's 8192; 4097 crosses every kernel's K tile
W_BITS = [2, 3, 4, 8]


def _shape(backend: str) -> tuple[int, int]:
    """(M, N): 17 x 33 crosses the GEMV/GEMM split and the N tiles; the Triton interpreter (NumPy, one program at a
    time) gets a smaller M and N and keeps every K."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    return (2, 3) if interpreted else (17, 33)


def _case(m, n, k, w_bits, power_of_two, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (w_bits - 1)), 2 ** (w_bits - 1) - 1
    qw = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    if power_of_two:
        w_scale = 2.0 ** -torch.randint(4, 9, (n,), generator=gen).float()
        x_step = torch.tensor([2.0**-5])
    else:
        w_scale = 0.01 + torch.rand(n, generator=gen) * 0.05
        x_step = torch.tensor([2.0 / 2**8 * (0.7 + 0.6 * torch.rand(1, generator=gen).item())])
    # 8-bit signed activations, a spread a little wider than the range so that both clamp ends are hit
    x = ((torch.rand(m, k, generator=gen) * 1.2 - 0.1) * 255 - 128) * x_step
    bias = torch.randn(n, generator=gen) if with_bias else None
    return x, qw, w_scale, x_step, bias


def _packed_and_exact(x, qw, w_scale, x_step, bias, w_bits):
    def dev(t):
        return None if t is None else t.to(DEVICE)

    y = lowbit.packed_linear(
        dev(x), dev(lowbit.pack(qw, w_bits)), dev(w_scale), w_bits, dev(x_step), 8, x_signed=True, bias=dev(bias)
    )
    with lowbit.use_backend("reference"):
        fq = lowbit.fake_quant(x, x_step, 8, signed=True)
    dq = qw.float() * w_scale[:, None]  # dequant(W) in float32, as a fake-quant weight holds it
    want = F.linear(fq.double(), dq.double(), None if bias is None else bias.double())
    return y.cpu().double(), want


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("w_bits", W_BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("k", K_VALUES, ids=lambda k: f"K{k}")
def test_relative_1e5_per_element_with_exact_fake_quant_values(backend, k, w_bits, with_bias):
    m, n = _shape(backend)
    x, qw, w_scale, x_step, bias = _case(m, n, k, w_bits, True, with_bias, seed=k + w_bits)
    y, want = _packed_and_exact(x, qw, w_scale, x_step, bias, w_bits)
    err = (y - want).abs()
    assert (err <= SPEC_RTOL * want.abs()).all(), f"worst relative error {(err / want.abs()).max():.3g}"


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("w_bits", W_BITS, ids=lambda b: f"w{b}")
@pytest.mark.parametrize("k", K_VALUES, ids=lambda k: f"K{k}")
def test_relative_1e5_per_output_row_with_any_steps(backend, k, w_bits, with_bias):
    m, n = _shape(backend)
    x, qw, w_scale, x_step, bias = _case(m, n, k, w_bits, False, with_bias, seed=k + w_bits)
    y, want = _packed_and_exact(x, qw, w_scale, x_step, bias, w_bits)
    rel = (y - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)
    assert (rel <= SPEC_RTOL).all(), f"worst row-wise relative error {rel.max():.3g}"
