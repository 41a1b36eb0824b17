"""SPEC section 6: every bad input of fake_quant raises ValueError/TypeError naming the argument, before any
kernel runs (the backend selector is replaced by a tripwire while these run)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import lowbit

X = torch.randn(4, 6)
STEP = torch.tensor(0.1)
CHAN = torch.full((6,), 0.1)


def fq(x=X, step=STEP, bits=4, **kwargs):
    return lambda: lowbit.fake_quant(x, step, bits, **kwargs)


def mb(x=X, steps=None, probs=None, bits=(2, 4), **kwargs):
    steps = torch.full((2,), 0.1) if steps is None else steps
    probs = torch.full((2,), 0.5) if probs is None else probs
    return lambda: lowbit.multi_branch_fake_quant(x, steps, probs, bits, **kwargs)


# (id, call, exception, argument named in the message)
CASES = [
    ("x-int", fq(x=torch.ones(3, dtype=torch.int32)), TypeError, "x"),
    ("x-complex", fq(x=torch.ones(3, dtype=torch.complex64)), TypeError, "x"),
    ("x-float64", fq(x=torch.ones(3, dtype=torch.float64)), TypeError, "x"),
    ("x-list", fq(x=[1.0, 2.0]), TypeError, "x"),
    ("step-float", fq(step=0.1), TypeError, "step"),
    ("step-int", fq(step=torch.tensor(1)), TypeError, "step"),
    ("step-wrong-length", fq(step=torch.full((5,), 0.1), axis=1), ValueError, "step"),
    ("step-length-for-default-axis", fq(step=CHAN), ValueError, "step"),
    ("step-2d-mismatch", fq(step=torch.full((2, 3), 0.1), axis=0), ValueError, "step"),
    ("step-other-device", fq(step=torch.tensor(0.1, device="meta")), ValueError, "step"),
    ("bits-low", fq(bits=1), ValueError, "bits"),
    ("bits-high", fq(bits=9), ValueError, "bits"),
    ("bits-float", fq(bits=4.0), TypeError, "bits"),
    ("bits-bool", fq(bits=True), TypeError, "bits"),
    ("signed-str", fq(signed="yes"), TypeError, "signed"),
    ("abs-step-int", fq(abs_step=1), TypeError, "abs_step"),
    ("axis-out-of-range", fq(step=CHAN, axis=2), ValueError, "axis"),
    ("axis-str", fq(step=CHAN, axis="1"), TypeError, "axis"),
    ("axis-on-scalar-x", fq(x=torch.tensor(1.0), step=STEP, axis=0), ValueError, "axis"),
    ("offset-int", fq(offset=torch.tensor(1)), TypeError, "offset"),
    ("offset-wrong-length", fq(step=CHAN, axis=1, offset=torch.zeros(4)), ValueError, "offset"),
    ("grad-scale-zero", fq(grad_scale=0.0), ValueError, "grad_scale"),
    ("grad-scale-negative", fq(grad_scale=-1.0), ValueError, "grad_scale"),
    ("grad-scale-nan", fq(grad_scale=math.nan), ValueError, "grad_scale"),
    ("grad-scale-str", fq(grad_scale="0.1"), TypeError, "grad_scale"),
    ("mb-bits-duplicate", mb(bits=[4, 4]), ValueError, "bits"),
    ("mb-bits-out-of-range", mb(bits=[1, 4]), ValueError, r"bits\[0\]"),
    ("mb-bits-empty", mb(bits=[], steps=torch.ones(0), probs=torch.ones(0)), ValueError, "bits"),
    ("mb-bits-int", mb(bits=4), TypeError, "bits"),
    ("mb-probs-length", mb(probs=torch.ones(3)), ValueError, "probs"),
    ("mb-steps-length", mb(steps=torch.ones(1)), ValueError, "steps"),
    ("mb-probs-int", mb(probs=torch.ones(2, dtype=torch.int64)), TypeError, "probs"),
    ("mb-x-int", mb(x=torch.ones(3, dtype=torch.int8)), TypeError, "x"),
    ("mb-grad-scale-length", mb(grad_scale=[0.1, 0.2, 0.3]), ValueError, "grad_scale"),
    ("mb-signed-int", mb(signed=1), TypeError, "signed"),
]


# Value rules need the tensor's values: each backend checks them at the start of its op, before its kernel
# (the C++ backend in C++, the others in Python), so these run on every backend.
VALUE_CASES = [
    ("step-zero", fq(step=torch.tensor(0.0)), "step"),
    ("step-negative", fq(step=torch.tensor([-0.1])), "step"),
    ("step-zero-abs-step", fq(step=torch.tensor([0.0]), abs_step=True), "step"),
    ("step-nan", fq(step=torch.tensor(math.nan)), "step"),
    ("step-inf", fq(step=torch.tensor(math.inf)), "step"),
    ("step-one-bad-channel", fq(step=torch.tensor([0.1, 0.1, 0.0, 0.1, 0.1, 0.1]), axis=1), "step"),
    ("offset-inf", fq(offset=torch.tensor(math.inf)), "offset"),
    ("offset-nan", fq(offset=torch.tensor([math.nan])), "offset"),
    (
        "mb-steps-zero",
        lambda: lowbit.multi_branch_fake_quant(X, torch.tensor([0.1, 0.0]), torch.ones(2), [2, 4]),
        "steps",
    ),
    (
        "mb-probs-nan",
        lambda: lowbit.multi_branch_fake_quant(X, torch.ones(2), torch.tensor([0.5, math.nan]), [2, 4]),
        "probs",
    ),
]


@pytest.mark.parametrize("call, argument", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_bad_values_are_rejected_by_every_backend(backend, call, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}\b must be"):
        call()


@pytest.fixture
def no_kernel_may_run(monkeypatch):
    def tripwire(device):
        raise AssertionError("a backend was selected before the arguments were checked")

    # each op file imports select; the op modules are shadowed by the functions of the same name in lowbit.ops
    for op in ("fake_quant", "multi_branch_fake_quant", "packed_linear"):
        monkeypatch.setattr(importlib.import_module(f"lowbit.ops.{op}"), "select", tripwire)


@pytest.mark.parametrize("call, exc, argument", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_naming_the_argument(no_kernel_may_run, call, exc, argument):
    with pytest.raises(exc, match=rf"(?<!\w){argument}(?!\w)"):
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
