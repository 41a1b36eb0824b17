"""torch.compile with Inductor (CPU C++ backend): lowbit's ops decompose, fuse, and keep SPEC numerics.

Op level (Inductor, C++ code generated and run): one compiled graph holds every op variant (per-tensor,
per-channel with offset, bf16, channels-last and strided inputs, values on rounding ties, the multi-branch op).
Its forward and dL/dx must equal eager mode bit for bit, its parameter gradients must be within SPEC's 1e-4 of
the float64 reference (tests/reference.py), Inductor's code must call no lowbit custom op except the per-channel
(weight) quantizers, which stay fused kernels (lowbit.ops.decompositions.stays_fused), and a bad step must fail
inside the compiled code.

Model level: every packaged model (W4A4; MobileNet-v2 and the small CNN also multi-branch, the small CNN after
``swap_fused``) compiles with ``fullgraph=True`` (a graph break raises) through Inductor's front half: its
decomposition table and partitioner, whose forward and backward graphs must hold no lowbit op but the per-channel
weight quantizers. Those graphs run
eagerly twice, with lowbit's ops decomposed and kept as opaque fused kernels: logits and weight gradients must
be bit-identical, quantizer gradients within SPEC's 1e-4. The small CNN also goes through Inductor's C++ code
generation and is compared with eager mode at a stated tolerance (Inductor's batch-norm arithmetic may differ by
float32 ulps, which a quantizer can turn into a step at a rounding tie; a deep 4-bit network amplifies those
flips, about 3% of the logits' norm for MobileNet-v2, which is why deep models are compared as above).

Inductor's C++ compile costs tens of seconds per graph on a 2-core machine (minutes for a MobileNet-v2 training
graph), so the op graph is compiled once per module and only the small CNN's models are compiled to C++;
bench/bench_step.py compiles MobileNet-v2 and ResNet-18 with Inductor in full.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import re

import numpy as np
import pytest
import reference as ref
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.compile_fx import select_decomp_table  # imports the lowerings its decompositions consult
from torch._inductor.utils import run_and_get_code

import lowbit
from lowbit.models import create_model
from lowbit.nn import LSQQuantizer, ReferenceLSQ
from lowbit.ops.decompositions import use_inductor_decompositions

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


@contextlib.contextmanager
def _no_inductor_caches():
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


# Every backward op fused or every one decomposed: the default (single-branch decomposed, multi-branch fused)
# is one of each, so these two cover each op both ways.
BACKWARD_MODES = {"backward fused": False, "backward decomposed": True}


@pytest.fixture(scope="module", params=list(BACKWARD_MODES))
def op_results(request):
    """Eager and Inductor runs of the op graph, and the Inductor code (forward and backward), with every backward
    op fused or every one decomposed."""
    backward = BACKWARD_MODES[request.param]
    inputs = _op_inputs()
    gen = torch.Generator().manual_seed(1)
    eager_outs = _ops({k: v.to(DEVICE) for k, v in inputs.items()})
    grads = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in eager_outs.items()}
    torch._dynamo.reset()
    compiled = torch.compile(_ops, backend="inductor", fullgraph=True)
    use_inductor_decompositions(True, backward=backward)
    try:  # Inductor's caches do not key on the decomposition table: off, or the other mode's code is served
        with _no_inductor_caches():
            (outs, dgrads), code = run_and_get_code(_run_ops, compiled, inputs, grads)
    finally:
        use_inductor_decompositions(True)
    return {
        "backward": backward,
        "inputs": inputs,
        "grads": grads,
        "eager": _run_ops(_ops, inputs, grads),
        "compiled": (outs, dgrads),
        "code": code,
        "fn": compiled,
    }


def _lowbit_calls(code: str) -> collections.Counter:
    """The lowbit custom ops Inductor's code calls, with their counts (comments and asserts left out)."""
    return collections.Counter(re.findall(r"= torch\.ops\.lowbit\.(\w+)\.default\(", code))


def test_inductor_inlines_the_ops(op_results):
    """Inductor used the forward decompositions: its forward code calls no lowbit custom op but those of the two
    per-channel quantizers ("weight", "chan"), which stay the fused kernels (stays_fused). The backward code
    calls the fused backward of every quantizer (backward fused) or only those of the two per-channel ones
    (backward decomposed)."""
    code = "\n".join(op_results["code"])
    assert len(op_results["code"]) >= 2, "expected a forward and a backward graph"
    if op_results["backward"]:
        want = {"fake_quant": 2, "fake_quant_backward": 2}
    else:
        want = {"fake_quant": 2, "fake_quant_backward": 7, "multi_branch_fake_quant_backward": 1}
    assert _lowbit_calls(code) == want, _lowbit_calls(code)
    assert "lowbit._C" not in code
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


def test_use_inductor_decompositions_rejects_bad_arguments():
    with pytest.raises(TypeError, match="enabled"):
        use_inductor_decompositions(1)
    with pytest.raises(TypeError, match="backward"):
        use_inductor_decompositions(True, backward="all")
    with pytest.raises(ValueError, match="backward"):
        use_inductor_decompositions(False, backward=True)


def test_default_table_keeps_only_the_multi_branch_backward_fused():
    from torch._inductor.decomposition import decompositions

    use_inductor_decompositions(True)
    ops = torch.ops.lowbit
    decomposed = {
        op
        for op in (
            ops.fake_quant,
            ops.fake_quant_backward,
            ops.multi_branch_fake_quant,
            ops.multi_branch_fake_quant_backward,
        )
        if op.default in decompositions
    }
    assert decomposed == {ops.fake_quant, ops.fake_quant_backward, ops.multi_branch_fake_quant}


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
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # compiled dropout draws other random numbers than eager dropout
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
ALL_MODELS = [
    ("small_cnn", "quantize"),
    ("small_cnn", "multi_branch"),
    ("small_cnn", "swap_fused"),
    ("mobilenet_v2", "quantize"),
    ("mobilenet_v2", "multi_branch"),
    ("mobilenet_v3_small", "quantize"),
    ("resnet18", "quantize"),
]
INDUCTOR_MODELS = [("small_cnn", "quantize"), ("small_cnn", "multi_branch"), ("small_cnn", "swap_fused")]


def _inductor_front_end(graphs: list):
    """A compile backend that runs Inductor's front half (Dynamo with fullgraph, AOTAutograd with Inductor's
    decomposition table and partitioner) and then runs the resulting aten graphs eagerly, recording them:
    what Inductor would generate code for, without the C++ compile of every kernel (minutes per model here)."""

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(
        fw_compiler=record,
        bw_compiler=record,
        decompositions=select_decomp_table,  # called after tracing: holds lowbit's entries by then
        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"),
    )


def _model_data():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=gen).to(DEVICE)
    return x, torch.randint(0, 10, (4,), generator=gen).to(DEVICE)


def _assert_matches_eager(got_out, got_grads, want_out, want_grads):
    # Tolerances: Inductor's batch-norm arithmetic may differ from eager by float32 ulps, and a 4-bit quantizer
    # turns an ulp at a rounding tie into one step. Measured on the small CNN: logits 0, gradients <= 2.3e-4.
    print(f"relative L2 difference: logits {_relative_l2(got_out, want_out):.2e}")
    assert _relative_l2(got_out, want_out) < 2e-2
    assert got_grads.keys() == want_grads.keys()
    total = _relative_l2(
        torch.cat([g.flatten() for g in got_grads.values()]), torch.cat([g.flatten() for g in want_grads.values()])
    )
    print(f"relative L2 difference: all gradients {total:.2e}")
    assert total < 5e-2, total


def _front_end_step(model, x, y, mode: str):
    """One training step through Inductor's front half, with lowbit's ops kept as custom ops ("opaque"),
    decomposed as by default ("default": the multi-branch backward stays fused) or with every backward op
    decomposed ("all"). Returns the logits, the gradients and, per graph (forward, backward), the lowbit op
    nodes left."""
    graphs = []
    use_inductor_decompositions(mode != "opaque", backward=True if mode == "all" else None)
    try:
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend=_inductor_front_end(graphs), fullgraph=True)
        out, grads = _step(compiled, x, y)
    finally:
        use_inductor_decompositions(True)
    assert len(graphs) == 2, "expected one forward and one backward graph"
    lowbit_nodes = [[n for n in gm.graph.nodes if str(n.target).startswith("lowbit.")] for gm in graphs]
    return out, grads, lowbit_nodes


def _per_channel(node) -> bool:
    """Whether a recorded lowbit node quantizes per channel (its step argument has more than one element)."""
    step = node.args[2] if "backward" in str(node.target) else node.args[1]
    return step.meta["val"].numel() > 1


def _is_quantizer_parameter(name: str) -> bool:
    return name.endswith((".step", ".steps", ".alpha"))


def _op_counts(nodes) -> collections.Counter:
    return collections.Counter(str(n.target).removeprefix("lowbit.").removesuffix(".default") for n in nodes)


@pytest.mark.parametrize("mode", ["default", "all"])
@pytest.mark.parametrize("arch, kind", ALL_MODELS, ids=[f"{a}-{k}" for a, k in ALL_MODELS])
def test_model_compiles_fullgraph_with_decomposed_ops(arch, kind, mode):
    """Every packaged model compiles to one graph (fullgraph=True raises on a graph break) whose forward holds no
    lowbit op once Inductor's table applies but the per-channel weight quantizers (one node per weight), and
    whose backward holds the fused backward of the weight quantizers and, by default, of every multi-branch
    quantizer ("all": of the weights only). And the decompositions change nothing: the same
    graphs with lowbit's fused kernels as opaque ops give bit-identical logits and weight/BN gradients, and
    quantizer step/alpha gradients within SPEC's 1e-4 (their sums are ordered differently)."""
    x, y = _model_data()
    model = _quantized(arch, kind, x)
    want_out, want_grads, (opaque_forward, _) = _front_end_step(model, x, y, "opaque")
    got_out, got_grads, (forward_left, backward_left) = _front_end_step(model, x, y, mode)
    weights = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    assert all(_per_channel(n) for n in forward_left), [str(n.target) for n in forward_left if not _per_channel(n)]
    assert _op_counts(forward_left) == {"fake_quant": weights}
    fused_backward = {"fake_quant_backward": weights}
    if mode == "default":  # and one per multi-branch quantizer of the opaque forward graph
        fused_backward["multi_branch_fake_quant_backward"] = _op_counts(opaque_forward)["multi_branch_fake_quant"]
    assert _op_counts(backward_left) == +collections.Counter(fused_backward)
    assert torch.equal(got_out, want_out)
    assert got_grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        if _is_quantizer_parameter(name):
            torch.testing.assert_close(got_grads[name], want, rtol=2e-4, atol=1e-7, msg=name)
        else:
            assert torch.equal(got_grads[name], want), name


@pytest.mark.parametrize("arch, kind", INDUCTOR_MODELS, ids=[f"{a}-{k}" for a, k in INDUCTOR_MODELS])
def test_model_compiles_with_inductor_and_matches_eager(arch, kind):
    x, y = _model_data()
    model = _quantized(arch, kind, x)
    want_out, want_grads = _step(model, x, y)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="inductor", fullgraph=True)  # raises on a graph break
    (got_out, got_grads), code = run_and_get_code(_step, compiled, x, y)
    forward = [c for c in code if re.search(r"AOT ID: \['\d+_forward'\]", c)]
    assert len(forward) == 1 and len(code) == 2, "expected one forward and one backward graph"
    assert _lowbit_calls(forward[0]).keys() == {"fake_quant"}  # the weights; activations are decomposed
    backward_ops = {"fake_quant_backward", "multi_branch_fake_quant_backward"}
    assert not _lowbit_calls("\n".join(code)).keys() - {"fake_quant"} - backward_ops
    _assert_matches_eager(got_out, got_grads, want_out, want_grads)
