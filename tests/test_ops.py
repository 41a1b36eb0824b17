"""torch.library integration: opcheck on every custom op and backend, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import lowbit

OPCHECK_CONFIGS = {
    "per-tensor": dict(shape=(5, 7), channels=1, axis=0, offset=False),
    "per-channel-axis0": dict(shape=(5, 7), channels=5, axis=0, offset=True),
    "per-channel-last": dict(shape=(3, 4, 6), channels=6, axis=2, offset=True),
}


def _op_args(shape, channels, axis, offset, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    step = (0.1 + torch.rand(channels, generator=gen)).to(DEVICE).requires_grad_(True)
    beta = (0.1 * torch.randn(channels, generator=gen)).to(DEVICE).requires_grad_(True) if offset else None
    return x, step, beta, 4, True, axis, 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("config", OPCHECK_CONFIGS, ids=list(OPCHECK_CONFIGS))
def test_opcheck_fake_quant(backend, config, dtype):
    args = _op_args(**OPCHECK_CONFIGS[config], dtype=dtype)
    torch.library.opcheck(torch.ops.lowbit.fake_quant.default, args)


@pytest.mark.parametrize("config", OPCHECK_CONFIGS, ids=list(OPCHECK_CONFIGS))
def test_opcheck_fake_quant_backward(backend, config):
    x, step, beta, *rest = _op_args(**OPCHECK_CONFIGS[config])
    grad = torch.randn_like(x)
    args = (grad, x.detach(), step.detach(), None if beta is None else beta.detach(), *rest)
    torch.library.opcheck(torch.ops.lowbit.fake_quant_backward.default, args)


@pytest.mark.parametrize("config", OPCHECK_CONFIGS, ids=list(OPCHECK_CONFIGS))
def test_opcheck_fake_quant_abs_step(backend, config):
    """The abs_step argument (a learned step of either sign), forward and backward op."""
    x, step, beta, *rest = _op_args(**OPCHECK_CONFIGS[config])
    with torch.no_grad():
        step[::2] *= -1.0
    torch.library.opcheck(torch.ops.lowbit.fake_quant.default, (x, step, beta, *rest, True))
    grad = torch.randn_like(x)
    args = (grad, x.detach(), step.detach(), None if beta is None else beta.detach(), *rest, True)
    torch.library.opcheck(torch.ops.lowbit.fake_quant_backward.default, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("channels", [None, 5], ids=["per-tensor", "per-channel"])
def test_compiled_lsq_quantizer_with_a_negative_step_matches_eager(compiler, channels):
    """LSQQuantizer hands the op its raw step with abs_step=True: compiled, the op and its decomposition use
    |step| and sign the step gradient, as eager mode does."""
    from lowbit.nn import LSQQuantizer

    torch.manual_seed(0)
    x = torch.randn(5, 8, device=DEVICE)
    quantizer = LSQQuantizer(4, signed=True, channels=channels).to(DEVICE)
    quantizer(x)
    with torch.no_grad():
        quantizer.step[0] *= -1.0
    grad = torch.randn_like(x)
    results = []
    for run in (quantizer, torch.compile(quantizer, backend=compiler, fullgraph=True)):
        xg = x.clone().requires_grad_(True)
        quantizer.step.grad = None
        y = run(xg)
        y.backward(grad)
        results.append((y.detach(), xg.grad, quantizer.step.grad.clone()))
    (y0, dx0, ds0), (y1, dx1, ds1) = results
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(dx1, dx0, rtol=0, atol=0)
    torch.testing.assert_close(ds1, ds0, rtol=1e-4, atol=1e-7)


class LSQConv(torch.nn.Module):
    """A conv whose weight (per-channel) and input (per-tensor) go through lowbit.fake_quant."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.w_step = torch.nn.Parameter(torch.full((8,), 0.05))
        self.a_step = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x):
        w = lowbit.fake_quant(self.conv.weight, self.w_step, 4, signed=True)
        x = lowbit.fake_quant(x, self.a_step, 4, signed=True)
        return torch.nn.functional.conv2d(x, w, self.conv.bias, padding=1)


def _loss_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler):
    torch.manual_seed(0)
    model = LSQConv().to(DEVICE)
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    want_out, want_grads = _loss_and_grads(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    got_out, got_grads = _loss_and_grads(compiled, x)
    torch.testing.assert_close(got_out, want_out)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_compiled_graph_calls_the_custom_op():
    """The compiled graph keeps lowbit::fake_quant as one node (it is not traced into and decomposed)."""
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x, s: lowbit.fake_quant(x, s, 4), backend=record, fullgraph=True)(
        torch.randn(8, device=DEVICE), torch.tensor(0.1, device=DEVICE)
    )
    assert any("lowbit.fake_quant" in t for t in seen), seen


@pytest.mark.parametrize("bits", [[4], [2, 4, 8], [8, 3, 5, 2]], ids=lambda b: "b" + "-".join(map(str, b)))
def test_opcheck_multi_branch(backend, bits):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 9, generator=gen).to(DEVICE).requires_grad_(True)
    steps = (0.05 + torch.rand(len(bits), generator=gen)).to(DEVICE).requires_grad_(True)
    probs = torch.softmax(torch.randn(len(bits), generator=gen), 0).to(DEVICE).requires_grad_(True)
    scales = [0.1] * len(bits)
    torch.library.opcheck(torch.ops.lowbit.multi_branch_fake_quant.default, (x, steps, probs, bits, False, scales))
    grad = torch.randn_like(x)
    args = (grad, x.detach(), steps.detach(), probs.detach(), bits, False, scales)
    torch.library.opcheck(torch.ops.lowbit.multi_branch_fake_quant_backward.default, args)


def test_public_function_and_registered_autograd_give_the_same_gradients():
    """lowbit.fake_quant's autograd.Function fast path and the op's register_autograd run the same backward op."""
    x = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    step = torch.full((6,), 0.2, device=DEVICE, requires_grad=True)
    grads = []
    for call in (
        lambda: lowbit.fake_quant(x, step, 3, signed=True, grad_scale=0.5),
        lambda: torch.ops.lowbit.fake_quant(x, step, None, 3, True, 0, 0.5),
    ):
        x.grad = step.grad = None
        call().backward(torch.ones_like(x))
        grads.append((x.grad.clone(), step.grad.clone()))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_fullgraph_multi_branch_layer():
    from lowbit.nn import MultiBranchQConv2d

    torch.manual_seed(0)
    layer = MultiBranchQConv2d(3, 4, 3, padding=1, a_bits_choices=(2, 4, 8)).to(DEVICE)
    x = torch.relu(torch.randn(2, 3, 6, 6, device=DEVICE))
    want_out, want_grads = _loss_and_grads(layer, x)
    torch._dynamo.reset()
    got_out, got_grads = _loss_and_grads(torch.compile(layer, backend="aot_eager", fullgraph=True), x)
    torch.testing.assert_close(got_out, want_out)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want)


class _RecordLowbitOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the lowbit ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lowbit":
            self.seen.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _profiled_lowbit_ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("lowbit::")}


@pytest.mark.parametrize("op", ["fake_quant", "multi_branch"])
def test_plain_eager_calls_skip_the_dispatcher_and_watched_calls_do_not(op):
    """Plain eager calls (a Tensor or Parameter, no mode, not compiling) run the kernels directly; under a dispatch
    mode the same call goes through torch.ops.lowbit, with bit-identical values and gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.randn(4, 6, 5, generator=gen).to(DEVICE))  # a weight quantizer's input
    step = torch.full((4,), 0.3, device=DEVICE, requires_grad=True)
    steps = torch.tensor([0.5, 0.1, 0.01], device=DEVICE, requires_grad=True)
    probs = torch.tensor([0.2, 0.3, 0.5], device=DEVICE, requires_grad=True)

    def run():
        if op == "fake_quant":
            y, params = lowbit.fake_quant(x, step, 4, signed=True), (x, step)
        else:
            y, params = lowbit.multi_branch_fake_quant(x, steps, probs, (2, 4, 8), signed=True), (x, steps, probs)
        grads = torch.autograd.grad(y, params, torch.ones_like(y))
        return (y.detach(), *grads)

    names = (
        ("fake_quant", "fake_quant_backward")
        if op == "fake_quant"
        else ("multi_branch_fake_quant", "multi_branch_fake_quant_backward")
    )
    assert _profiled_lowbit_ops(run) == set(), "plain eager calls went through the dispatcher"
    plain = run()
    with _RecordLowbitOps() as mode:
        watched = run()
    assert sorted(set(mode.seen)) == sorted(names)
    for a, b in zip(plain, watched, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fake_tensor_and_meta_calls_use_the_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(3, 5)
        y = lowbit.fake_quant(x, torch.full((1,), 0.1), 4, signed=True)
    assert y.shape == (3, 5)
    x = torch.randn(3, 5, device="meta", requires_grad=True)
    y = lowbit.multi_branch_fake_quant(x, torch.ones(2, device="meta"), torch.ones(2, device="meta"), (2, 4))
    assert y.device.type == "meta" and y.shape == (3, 5)
