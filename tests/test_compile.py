"""torch.compile with Inductor (CPU C++ backend): lowbit's ops decompose, fuse, and keep SPEC numerics.

Op level: one compiled graph holds every op variant (per-tensor, per-channel with offset, bf16, channels-last and
strided inputs, values on rounding ties, the multi-branch op). Its forward must equal eager mode bit for bit,
its gradients must be within SPEC's 1e-4 of the float64 reference (tests/reference.py), and Inductor's code
must hold no lowbit custom op (the decompositions were used). Model level: every packaged model, quantized
W4A4, multi-branch, and after ``swap_fused``, compiles with ``fullgraph=True`` (no graph break) and matches
eager mode; there Inductor's own reassociation of batch-norm and conv sums changes float32 values by ulps (as it
does for the float model), which can move a rare value across a rounding tie, so whole-model outputs are
compared at a stated tolerance rather than bit for bit.

Inductor compiles are slow (tens of seconds per graph on a 2-core machine), so the op graph is compiled once
per module and the model graphs are kept small.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch._inductor.utils import run_and_get_code

import lowbit
from lowbit.models import create_model
from lowbit.nn import LSQQuantizer, ReferenceLSQ

# ---- op level --------------------------------------------------------------------------------------------------


def _op_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    step = torch.tensor([0.1])
    ties = step * (torch.arange(-12, 12).float() + 0.5)  # v = k + 1/2 exactly: round half to even decides
    act = torch.cat([ties, torch.randn(6 * 7 * 5 * 5 - 24, generator=gen)]).reshape(6, 7, 5, 5)
    return {
        "act": act,
        "step": step,
        "weight": torch.randn(8, 6, 3, 3, generator=gen),
        "w_step": 0.05 + 0.1 * torch.rand(8, generator=gen),
        "chan": torch.randn(4, 7, 5, generator=gen),  # per-channel along axis 1, with an LSQ+ offset
        "c_step": 0.1 + 0.2 * torch.rand(7, generator=gen),
        "c_offset": 0.1 * torch.randn(7, generator=gen),
        "half": torch.randn(5, 33, generator=gen).bfloat16(),
        "nhwc": torch.randn(2, 6, 4, 4, generator=gen).to(memory_format=torch.channels_last),
        "strided": torch.randn(9, 12, generator=gen).t(),  # a transposed view: not contiguous
        "mb": torch.relu(torch.randn(3, 5, 7, generator=gen)),
        "mb_steps": torch.tensor([0.4, 0.1, 0.01]),
        "mb_probs": torch.softmax(torch.randn(3, generator=gen), 0),
    }


MB_BITS = [2, 4, 8]


def _ops(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every op variant, with neighbours Inductor may fuse into them (ReLU, add, multiply)."""
    return {
        "act": lowbit.fake_quant(torch.relu(t["act"]) + 0.0, t["step"], 4),
        "act_signed": lowbit.fake_quant(t["act"], t["step"], 3, signed=True) * 2,
        "weight": lowbit.fake_quant(t["weight"], t["w_step"], 4, signed=True),
        "chan": lowbit.fake_quant(t["chan"], t["c_step"], 5, signed=True, offset=t["c_offset"], axis=1),
        "half": lowbit.fake_quant(t["half"], t["step"], 8, signed=True),
        "nhwc": lowbit.fake_quant(t["nhwc"], t["step"], 2, signed=True),
        "strided": lowbit.fake_quant(t["strided"], t["step"], 4, signed=True),
        "mb": lowbit.multi_branch_fake_quant(t["mb"], t["mb_steps"], t["mb_probs"], MB_BITS),
    }


def _run_ops(fn, inputs: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]):
    leaves = {k: v.detach().clone().to(DEVICE).requires_grad_(True) for k, v in inputs.items()}
    outs = fn(leaves)
    torch.autograd.backward([outs[k] for k in grads], [grads[k].to(DEVICE) for k in grads])
    return {k: v.detach() for k, v in outs.items()}, {k: v.grad for k, v in leaves.items()}


@pytest.fixture(scope="module")
def op_results():
    """Eager and Inductor runs of the op graph, and the Inductor code (forward and backward)."""
    inputs = _op_inputs()
    gen = torch.Generator().manual_seed(1)
    eager_outs = _ops({k: v.to(DEVICE) for k, v in inputs.items()})
    grads = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in eager_outs.items()}
    torch._dynamo.reset()
    compiled = torch.compile(_ops, backend="inductor", fullgraph=True)
    (outs, dgrads), code = run_and_get_code(_run_ops, compiled, inputs, grads)
    return {
        "inputs": inputs,
        "grads": grads,
        "eager": _run_ops(_ops, inputs, grads),
        "compiled": (outs, dgrads),
        "code": code,
        "fn": compiled,
    }


def test_inductor_inlines_the_ops(op_results):
    """Inductor used the decompositions: no lowbit custom op is called from its code, forward or backward."""
    code = "\n".join(op_results["code"])
    assert len(op_results["code"]) >= 2, "expected a forward and a backward graph"
    assert "torch.ops.lowbit" not in code and "lowbit_C" not in code, code[:2000]
    assert "step must be positive and finite" in code  # the value check is compiled in


def test_compiled_forward_is_bit_identical(op_results):
    eager, compiled = op_results["eager"][0], op_results["compiled"][0]
    for name, want in eager.items():
        got = compiled[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.float().view(torch.int32), want.float().view(torch.int32)), name


def test_compiled_dx_is_bit_identical(op_results):
    eager, compiled = op_results["eager"][1], op_results["compiled"][1]
    for name in ("act", "weight", "chan", "half", "nhwc", "strided", "mb"):
        assert torch.equal(compiled[name], eager[name]), name


def _assert_sum_close(actual: torch.Tensor, want: np.ndarray, scale: np.ndarray, what: str) -> None:
    """SPEC: relative error under 1e-4 of the float64 sum; a cancelling sum is judged by the size of its terms."""
    got = ref.as_np(actual).reshape(-1)
    bound = 1e-4 * np.abs(want) + 1e-6 * scale + 1e-30
    assert np.all(np.abs(got - want) <= bound), f"{what}: got {got}, want {want}"


def test_compiled_parameter_gradients_within_spec(op_results):
    t, g, (_, grads) = op_results["inputs"], op_results["grads"], op_results["compiled"]
    chan = ref.fake_quant(t["chan"], t["c_step"], 5, True, offset=t["c_offset"], axis=1, grad=g["chan"])
    _assert_sum_close(grads["c_step"], chan.dstep, chan.dstep_scale, "per-channel dstep")
    _assert_sum_close(grads["c_offset"], chan.doffset, chan.doffset_scale, "per-channel doffset")
    weight = ref.fake_quant(t["weight"], t["w_step"], 4, True, axis=0, grad=g["weight"])
    _assert_sum_close(grads["w_step"], weight.dstep, weight.dstep_scale, "weight dstep")
    mb = ref.multi_branch(t["mb"], t["mb_steps"], t["mb_probs"], MB_BITS, False, grad=g["mb"])
    _assert_sum_close(grads["mb_steps"], mb.dsteps, mb.dsteps_scale, "multi-branch dsteps")
    _assert_sum_close(grads["mb_probs"], mb.dprobs, mb.dprobs_scale, "multi-branch dprobs")
    # step is shared by five uses; each use's sum is within SPEC, so is their total against the eager total
    torch.testing.assert_close(grads["step"], op_results["eager"][1]["step"], rtol=2e-4, atol=1e-6)


def test_compiled_graph_checks_step_values(op_results):
    """Under compile the step check runs inside the compiled kernel: RuntimeError (eager: ValueError)."""
    bad = dict(op_results["inputs"], step=torch.tensor([0.0]))
    with pytest.raises(RuntimeError, match="step must be positive and finite"):
        op_results["fn"]({k: v.to(DEVICE) for k, v in bad.items()})
    bad = dict(op_results["inputs"], mb_steps=torch.tensor([0.4, float("nan"), 0.01]))
    with pytest.raises(RuntimeError, match="steps must be positive and finite"):
        op_results["fn"]({k: v.to(DEVICE) for k, v in bad.items()})


# ---- model level -----------------------------------------------------------------------------------------------


def _to_composition(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its LSQQuantizers replaced by plain-PyTorch ReferenceLSQ twins (swap_fused's input)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LSQQuantizer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, ReferenceLSQ.from_lsq(module))
    return model


def _quantized(arch: str, kind: str, x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, **MODEL_KWARGS[arch]).to(DEVICE)
    if kind == "multi_branch":
        model = lowbit.quantize(model, w_bits=4, multi_branch=(2, 4, 8))
    else:
        model = lowbit.quantize(model, w_bits=4, a_bits=4)
    with torch.no_grad():
        model(x)  # LSQ steps from the first batch: an eager step (it reads the data)
    if kind == "swap_fused":
        model = _to_composition(model)
        lowbit.swap_fused(model)
    return model.train()


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _relative_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


# Narrow versions keep the eager runs short; the compiled graph has the same structure as the full-width model.
MODEL_KWARGS = {
    "small_cnn": dict(in_channels=3, width=8),
    "mobilenet_v2": dict(small_input=True, width_mult=0.25),
    "mobilenet_v3_small": dict(small_input=True, width_mult=0.25),
    "resnet18": dict(small_input=True, width_mult=0.25),
}
MODEL_CASES = [
    pytest.param("small_cnn", "quantize", id="small_cnn-W4A4"),
    pytest.param("small_cnn", "multi_branch", id="small_cnn-multi_branch"),
    pytest.param("small_cnn", "swap_fused", id="small_cnn-swap_fused"),
    pytest.param("mobilenet_v2", "quantize", id="mobilenet_v2-W4A4", marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_small", "quantize", id="mobilenet_v3_small-W4A4", marks=pytest.mark.slow),
    pytest.param("resnet18", "quantize", id="resnet18-W4A4", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch, kind", MODEL_CASES)
def test_model_compiles_fullgraph_and_matches_eager(arch, kind):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=gen).to(DEVICE)
    y = torch.randint(0, 10, (4,), generator=gen).to(DEVICE)
    model = _quantized(arch, kind, x)
    want_out, want_grads = _step(model, x, y)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="inductor", fullgraph=True)  # raises on a graph break
    (got_out, got_grads), code = run_and_get_code(_step, compiled, x, y)
    assert "torch.ops.lowbit" not in "\n".join(code)
    # Tolerances: Inductor's batch-norm/conv arithmetic differs from eager by float32 ulps (so does the fp32
    # model's), and a quantizer turns an ulp at a rounding tie into one step; measured differences are ~1e-3.
    print(f"relative L2 difference: logits {_relative_l2(got_out, want_out):.2e}")
    assert _relative_l2(got_out, want_out) < 2e-2
    assert got_grads.keys() == want_grads.keys()
    total = _relative_l2(
        torch.cat([g.flatten() for g in got_grads.values()]), torch.cat([g.flatten() for g in want_grads.values()])
    )
    print(f"relative L2 difference: all gradients {total:.2e}")
    assert total < 5e-2, total
