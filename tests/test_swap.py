"""swap_fused on LSQ code written the way public repositories write it (tests/lsq_idioms.py): every idiom swapped,
the same Parameters kept, training steps equal before and after the swap, eager and compiled; what is not LSQ
kept with the reason; register_fake_quant for what the pattern cannot see."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lsq_idioms import (
    ClampAfterRound,
    ClampFirst,
    InlineQuantConv,
    LazyInitLSQ,
    LSQPlus,
    LsqQuan,
    QuanConv2d,
    QuanLinear,
    Reciprocal,
    ViewPerChannel,
    lsq_net_quantize,
)
from torch import nn

import lowbit
from lowbit.tools.swap import FusedLSQ, swap_fused

# Training-step agreement: the swapped model computes the same formulas with other roundings of the step
# gradient sums (SPEC section 1 allows 1e-4 relative) and of ``(g * s) / s``; over a few SGD steps that stays
# within these bounds (a value flipping at a rounding tie would exceed them and fail the test).
RTOL, ATOL = 1e-4, 1e-5


class IdiomNet(nn.Module):
    """One small network holding every idiom: lsq-net conv and linear (per-channel weights, per-tensor
    activations), LSQ+ with an offset, clamp before the division with a (1, C, 1, 1) step, a 1-D step viewed per
    channel, ``x * (1/s)``, and a lazily initialised module fx cannot trace."""

    N_QUANTIZERS = 9

    def __init__(self):
        super().__init__()
        self.plus = LSQPlus(4)
        self.conv1 = QuanConv2d(nn.Conv2d(3, 8, 3, padding=1), LsqQuan(4), LsqQuan(4, per_channel=False))
        self.clamp_first = ClampFirst(8)
        self.weight_quant = ViewPerChannel(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.lazy = LazyInitLSQ()
        self.recip = Reciprocal()
        self.fc = QuanLinear(nn.Linear(8, 10), LsqQuan(4), LsqQuan(4, all_positive=True, per_channel=False))

    def forward(self, x):
        x = self.conv1(self.plus(x))
        x = self.clamp_first(torch.relu(x))
        x = F.conv2d(x, self.weight_quant(self.conv2.weight), self.conv2.bias, padding=1)
        x = self.recip(torch.relu(self.lazy(x)))
        return self.fc(x.mean((2, 3)))


def _idiom_net(seed=0):
    torch.manual_seed(seed)
    net = IdiomNet()
    net(torch.randn(4, 3, 8, 8))  # the lazy quantizer initialises its step
    return net


def _batch(n=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("with_example", [False, True])
def test_every_idiom_is_swapped_keeping_the_same_parameters(with_example):
    net = _idiom_net()
    params_before = {name: p for name, p in net.named_parameters()}
    keys_before = list(net.state_dict())
    report = swap_fused(net, example_input=_batch()[0] if with_example else None)
    assert report.kept == [], str(report)
    assert len(report.swapped) == IdiomNet.N_QUANTIZERS, str(report)
    assert sum(isinstance(m, FusedLSQ) for m in net.modules()) == IdiomNet.N_QUANTIZERS
    assert list(net.state_dict()) == keys_before
    after = dict(net.named_parameters())
    assert after.keys() == params_before.keys()
    assert all(after[n] is p for n, p in params_before.items()), "swap_fused must keep the Parameter objects"
    assert "matched by behaviour alone" in report.notes["weight_quant"]  # fx cannot trace its *shape


def test_what_the_probes_read_matches_the_users_code():
    net = _idiom_net()
    swap_fused(net)
    w, a = net.conv1.quan_w_fn.fit, net.conv1.quan_a_fn.fit
    # lsq-net: 1/sqrt(thd_pos * numel(x)) even per channel; signed [-8, 7]; keepdim step along axis 0
    assert (w.bits, w.signed, w.axis, w.gs_power) == (4, True, 0, -0.5) and w.gs_coef == 1 / math.sqrt(7)
    assert (a.bits, a.signed, a.axis) == (4, True, None)
    assert net.fc.quan_a_fn.fit.signed is False and net.fc.quan_a_fn.thd_pos == 15  # attributes copied
    plus = net.plus.fit
    assert (plus.step_name, plus.offset_name, plus.signed) == ("s", "beta", True)
    cf = net.clamp_first.fit  # per-channel count in the grad scale: sqrt(C / Qp) / sqrt(numel)
    assert (cf.axis, cf.signed, cf.gs_power) == (1, False, -0.5) and cf.gs_coef == math.sqrt(8 / 15)
    view = net.weight_quant.fit
    assert (view.step_name, view.axis, view.gs_coef, view.gs_power) == ("alpha", 0, 1.0, 0.0)
    assert (net.recip.fit.bits, net.recip.fit.signed) == (8, False)
    assert net.lazy.fit.step_name == "step_size"


def _sgd_steps(model, opt, batches):
    outs = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out, y).backward()
        opt.step()
        outs.append(out.detach())
    return outs


def _assert_same_training(reference, swapped, run_swapped, steps=4):
    """SGD with momentum on both; the swapped model's optimizer is made BEFORE the swap (it must keep working)."""
    batches = [_batch(8, seed=s) for s in range(steps)]
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    want = _sgd_steps(reference, opt_ref, batches)
    got = run_swapped(batches)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"step {i} output: {m}")
    for (name, p), (_, q) in zip(swapped.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_training_steps_equal_before_and_after_the_swap_eager():
    reference = _idiom_net()
    swapped = copy.deepcopy(reference)
    opt = torch.optim.SGD(swapped.parameters(), lr=0.05, momentum=0.9)
    report = swap_fused(swapped)
    assert len(report.swapped) == IdiomNet.N_QUANTIZERS
    _assert_same_training(reference, swapped, lambda batches: _sgd_steps(swapped, opt, batches))


def test_training_steps_equal_compiled_fullgraph_and_running_the_fused_op():
    from torch._inductor.compile_fx import compile_fx

    graphs = []

    def recording_inductor(gm, example_inputs):
        code = gm.print_readable(print_output=False)
        graphs.append([line for line in code.splitlines() if not line.strip().startswith("#")])
        return compile_fx(gm, example_inputs)

    reference = _idiom_net()
    swapped = copy.deepcopy(reference)
    opt = torch.optim.SGD(swapped.parameters(), lr=0.05, momentum=0.9)
    swap_fused(swapped)
    compiled = torch.compile(swapped, fullgraph=True, backend=recording_inductor)
    _assert_same_training(reference, swapped, lambda batches: _sgd_steps(compiled, opt, batches), steps=3)
    forward_graph = graphs[0]
    assert sum("= torch.ops.lowbit.fake_quant(" in line for line in forward_graph) == IdiomNet.N_QUANTIZERS
    assert not any("round" in line for line in forward_graph)
    # another batch size: the lsq-net grad scale follows numel(x) also under dynamic shapes
    x, _ = _batch(5, seed=9)
    torch.testing.assert_close(compiled(x), reference(x), rtol=RTOL, atol=ATOL)


def test_lsq_net_model_swapped_in_two_lines_trains_like_the_original():
    torch.manual_seed(0)
    model = lsq_net_quantize(
        nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)
        )
    )
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    report = lowbit.swap_fused(model)
    assert (len(report.swapped), len(report.kept)) == (6, 0), str(report)
    _assert_same_training(reference, model, lambda batches: _sgd_steps(model, opt, batches))


def test_modules_that_are_not_lsq_are_kept_with_the_reason():
    torch.manual_seed(0)
    symmetric = QuanConv2d(nn.Conv2d(3, 8, 3), LsqQuan(4, symmetric=True), LsqQuan(4, per_channel=False))
    model = nn.Sequential(ClampAfterRound(), InlineQuantConv(3, 3, 3), symmetric)
    before = copy.deepcopy(model)
    report = swap_fused(model)
    kept = {name: why for name, _, why in report.kept}
    assert set(kept) == {"0", "1", "2.quan_w_fn"}, str(report)
    assert "range [-7, 7]" in kept["2.quan_w_fn"]
    assert "no division of the input" in kept["1"]
    assert "register_fake_quant" in str(report)
    assert [name for name, _, _ in report.swapped] == ["2.quan_a_fn"]
    assert type(model[0]) is ClampAfterRound and type(model[2].quan_w_fn) is LsqQuan
    for (name, p), (_, q) in zip(model.state_dict().items(), before.state_dict().items(), strict=True):
        assert torch.equal(p, q), f"{name} changed by the probes"


def test_refused_when_the_gradients_differ():
    """ClampAfterRound has LSQ's values but not its x gradient (the range is tested on the rounded value)."""
    report = swap_fused(nn.Sequential(ClampAfterRound()))
    assert report.swapped == [] and len(report.kept) == 1


class OpaqueLSQ(nn.Module):
    """LSQ through an autograd.Function with its gradient written by hand, learning the log of its step: the
    pattern finds the division but the parameter is no step (fake_quant needs s = exp(log_s))."""

    def __init__(self, bits=4):
        super().__init__()
        self.bits = bits
        self.log_s = nn.Parameter(torch.tensor([math.log(0.2)]))

    def forward(self, x):
        return _OpaqueFn.apply(x, self.log_s.exp(), self.bits)


class _OpaqueFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, bits):
        qn, qp = lowbit.quant_range(bits, True)
        ctx.save_for_backward(x, s)
        ctx.range = (qn, qp)
        return torch.clamp(torch.round(x / s), qn, qp) * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        qn, qp = ctx.range
        v = x / s
        inside = (v >= qn) & (v <= qp)
        ds = torch.where(inside, v.round() - v, v.clamp(qn, qp)) * g / math.sqrt(x.numel() * qp)
        return g * inside, ds.sum().reshape(1), None


class FusedOpaque(nn.Module):
    def __init__(self, original: OpaqueLSQ, bits=None):
        super().__init__()
        self.bits = bits or original.bits
        self.log_s = original.log_s  # the same Parameter

    def forward(self, x):
        return lowbit.fake_quant(x, self.log_s.exp(), self.bits, signed=True)


def test_register_fake_quant_swaps_what_the_pattern_cannot_see():
    before = swap_fused(nn.Sequential(OpaqueLSQ()))
    assert before.swapped == [] and "not positive" in before.kept[0][2], "unregistered, it is listed as kept"

    class WrongBits(OpaqueLSQ):
        pass

    lowbit.register_fake_quant(OpaqueLSQ, FusedOpaque)
    lowbit.register_fake_quant(WrongBits, lambda m: FusedOpaque(m, bits=3))
    model = nn.Sequential(OpaqueLSQ(), WrongBits())
    step = model[0].log_s
    report = swap_fused(model)
    assert [(n, new) for n, _, new in report.swapped] == [("0", "FusedOpaque")]
    assert report.kept[0][0] == "1" and "differ" in report.kept[0][2]
    assert isinstance(model[0], FusedOpaque) and model[0].log_s is step and type(model[1]) is WrongBits


def test_bad_arguments():
    with pytest.raises(TypeError, match="cls"):
        lowbit.register_fake_quant(3, FusedOpaque)
    with pytest.raises(TypeError, match="to_fused"):
        lowbit.register_fake_quant(OpaqueLSQ, 3)
    with pytest.raises(TypeError, match="example_input"):
        swap_fused(nn.Sequential(LSQPlus(4)), example_input=[1, 2])
    with pytest.raises(TypeError, match="model"):
        swap_fused("model")
