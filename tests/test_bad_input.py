"""SPEC section 6: every bad input of fake_quant raises ValueError/TypeError naming the argument, before any
kernel runs (the backend selector is replaced by a tripwire while these run)."""

from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit import ops

X = torch.randn(4, 6)
STEP = torch.tensor(0.1)
CHAN = torch.full((6,), 0.1)


def fq(x=X, step=STEP, bits=4, **kwargs):
    return lambda: lowbit.fake_quant(x, step, bits, **kwargs)


# (id, call, exception, argument named in the message)
CASES = [
    ("x-int", fq(x=torch.ones(3, dtype=torch.int32)), TypeError, "x"),
    ("x-complex", fq(x=torch.ones(3, dtype=torch.complex64)), TypeError, "x"),
    ("x-float64", fq(x=torch.ones(3, dtype=torch.float64)), TypeError, "x"),
    ("x-list", fq(x=[1.0, 2.0]), TypeError, "x"),
    ("step-float", fq(step=0.1), TypeError, "step"),
    ("step-int", fq(step=torch.tensor(1)), TypeError, "step"),
    ("step-zero", fq(step=torch.tensor(0.0)), ValueError, "step"),
    ("step-negative", fq(step=torch.tensor([-0.1])), ValueError, "step"),
    ("step-nan", fq(step=torch.tensor(math.nan)), ValueError, "step"),
    ("step-inf", fq(step=torch.tensor(math.inf)), ValueError, "step"),
    ("step-one-bad-channel", fq(step=torch.tensor([0.1, 0.1, 0.0, 0.1, 0.1, 0.1]), axis=1), ValueError, "step"),
    ("step-wrong-length", fq(step=torch.full((5,), 0.1), axis=1), ValueError, "step"),
    ("step-length-for-default-axis", fq(step=CHAN), ValueError, "step"),
    ("step-2d-mismatch", fq(step=torch.full((2, 3), 0.1), axis=0), ValueError, "step"),
    ("step-other-device", fq(step=torch.tensor(0.1, device="meta")), ValueError, "step"),
    ("bits-low", fq(bits=1), ValueError, "bits"),
    ("bits-high", fq(bits=9), ValueError, "bits"),
    ("bits-float", fq(bits=4.0), TypeError, "bits"),
    ("bits-bool", fq(bits=True), TypeError, "bits"),
    ("signed-str", fq(signed="yes"), TypeError, "signed"),
    ("axis-out-of-range", fq(step=CHAN, axis=2), ValueError, "axis"),
    ("axis-str", fq(step=CHAN, axis="1"), TypeError, "axis"),
    ("axis-on-scalar-x", fq(x=torch.tensor(1.0), step=STEP, axis=0), ValueError, "axis"),
    ("offset-int", fq(offset=torch.tensor(1)), TypeError, "offset"),
    ("offset-wrong-length", fq(step=CHAN, axis=1, offset=torch.zeros(4)), ValueError, "offset"),
    ("offset-inf", fq(offset=torch.tensor(math.inf)), ValueError, "offset"),
    ("offset-nan", fq(offset=torch.tensor([math.nan])), ValueError, "offset"),
    ("grad-scale-zero", fq(grad_scale=0.0), ValueError, "grad_scale"),
    ("grad-scale-negative", fq(grad_scale=-1.0), ValueError, "grad_scale"),
    ("grad-scale-nan", fq(grad_scale=math.nan), ValueError, "grad_scale"),
    ("grad-scale-str", fq(grad_scale="0.1"), TypeError, "grad_scale"),
]


@pytest.fixture
def no_kernel_may_run(monkeypatch):
    def tripwire(device):
        raise AssertionError("a backend was selected before the arguments were checked")

    monkeypatch.setattr(ops, "select", tripwire)


@pytest.mark.parametrize("call, exc, argument", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_naming_the_argument(no_kernel_may_run, call, exc, argument):
    with pytest.raises(exc, match=rf"\b{argument}\b"):
        call()


def test_tripwire_fires_for_good_input(no_kernel_may_run):
    """The fixture really guards the kernels: a valid call reaches the selector."""
    with pytest.raises(AssertionError, match="selected"):
        lowbit.fake_quant(X, STEP, 4)


def test_use_backend_rejects_unknown_and_non_string_names():
    with pytest.raises(ValueError, match=r"\bname\b"):
        with lowbit.use_backend("fastest"):
            pass
    with pytest.raises(TypeError, match=r"\bname\b"):
        with lowbit.use_backend(3):
            pass


def test_empty_input_returns_empty_and_zero_step_gradient():
    x = torch.empty(0, 5, requires_grad=True)
    step = torch.full((5,), 0.1, requires_grad=True)
    y = lowbit.fake_quant(x, step, 4, axis=1)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 5) and torch.equal(step.grad, torch.zeros(5))
