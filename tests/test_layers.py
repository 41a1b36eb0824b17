"""Quantized layers, multi-branch layers, quantize(), swap_fused() and the BOPs cost model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import LSQQuantizer, MultiBranchQConv2d, MultiBranchQLinear, QConv2d, QLinear, ReferenceLSQ
from lowbit.tools.bops import (
    bops,
    expected_bops,
    float_parameter_bytes,
    ideal_weight_bytes,
    layer_macs,
    model_bytes,
    weight_bytes,
)
from lowbit.tools.quantize import FusedFakeQuantize, quantize, swap_fused


def _relu_input(*shape, seed=0):
    return torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


# ---- single-branch layers ------------------------------------------------------------------------------------


def test_qconv2d_is_conv_of_fake_quantized_input_and_weight():
    conv = nn.Conv2d(6, 10, 3, padding=1, groups=2)
    layer = QConv2d.from_float(conv, w_bits=3, a_bits=5)
    x = _relu_input(2, 6, 9, 9)
    y = layer(x)
    assert layer.act_quant.signed is False and layer.act_quant.initialized  # chosen on the first batch
    xq = lowbit.fake_quant(x, layer.act_quant.step, 5)
    wq = lowbit.fake_quant(conv.weight, layer.weight_quant.step, 3, signed=True)
    torch.testing.assert_close(y, F.conv2d(xq, wq, conv.bias, padding=1, groups=2), rtol=0, atol=0)


def test_lsq_step_initialisation():
    x = torch.randn(4, 8, 5, 5)
    q = LSQQuantizer(4, signed=True)
    q(x)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-6)
    w = torch.randn(8, 3, 3, 3)
    qw = LSQQuantizer(2, signed=True, channels=8)
    qw(w)
    torch.testing.assert_close(qw.step.detach(), 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(1))


def test_bits_can_change_after_construction_and_are_checked():
    layer = QLinear(5, 3, w_bits=4, a_bits=4)
    layer.w_bits, layer.a_bits = 2, 8
    assert layer.weight_quant.bits == 2 and layer.act_quant.bits == 8
    with pytest.raises(ValueError, match="bits"):
        layer.w_bits = 9


def test_quantized_layers_train():
    layer = QLinear(7, 4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(16, 7), torch.randn(16, 4)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and layer.weight_quant.step.grad is not None


# ---- multi-branch layers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [(2, 4, 8), (3,), (8, 2, 5, 4)])
def test_multi_branch_conv_equals_per_branch_form(bits):
    """One convolution of the mixed input equals the sum of one convolution per branch (linearity)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = MultiBranchQConv2d.from_float(conv, w_bits=4, a_bits_choices=bits)
    with torch.no_grad():
        layer.act_quant.alpha.normal_()
    x = _relu_input(2, 4, 7, 7, seed=1)
    y = layer(x)
    wq = lowbit.fake_quant(conv.weight, layer.weight_quant.step, 4, signed=True)
    probs = layer.act_quant.probs()
    per_branch = sum(
        probs[i] * F.conv2d(lowbit.fake_quant(x, layer.act_quant.steps[i], b), wq, conv.bias, padding=1)
        for i, b in enumerate(bits)
    )
    bias_excess = (probs.sum() - 1) * conv.bias.view(1, -1, 1, 1)  # the per-branch form adds the bias B times
    torch.testing.assert_close(y, per_branch - bias_excess, rtol=1e-5, atol=1e-5)


def test_expected_bops_is_differentiable_in_alpha():
    layer = MultiBranchQLinear(10, 3, w_bits=4, a_bits_choices=(2, 4, 8))
    macs = layer_macs(layer, torch.randn(5, 10))
    assert macs == {"": 30}  # the layer is the model: its name is ""
    cost = expected_bops(layer, macs)
    assert cost.item() == pytest.approx(30 * 4 * (2 + 4 + 8) / 3)
    cost.backward()
    assert layer.act_quant.alpha.grad.abs().sum() > 0


def test_to_single_branch_keeps_weights_and_the_chosen_step():
    conv = nn.Conv2d(3, 5, 1)
    layer = MultiBranchQConv2d.from_float(conv, a_bits_choices=(2, 4, 8))
    x = _relu_input(1, 3, 4, 4)
    layer(x)
    with torch.no_grad():
        layer.act_quant.alpha.copy_(torch.tensor([0.0, 50.0, 0.0]))
    single = layer.to_single_branch()
    assert isinstance(single, QConv2d) and single.a_bits == 4 == layer.selected_bits()
    assert torch.equal(single.weight, layer.weight) and torch.equal(single.act_quant.step, layer.act_quant.steps[1:2])
    torch.testing.assert_close(single(x), layer(x), rtol=1e-5, atol=1e-5)


# ---- quantize and swap_fused -------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).flatten(1))


def test_quantize_replaces_layers_and_keeps_first_and_last_at_8_bits():
    model = quantize(Net(), w_bits=3, a_bits=2)
    assert isinstance(model.stem, QConv2d) and (model.stem.w_bits, model.stem.a_bits) == (8, 8)
    assert isinstance(model.head, QLinear) and (model.head.w_bits, model.head.a_bits) == (8, 8)
    assert (model.body[1].w_bits, model.body[1].a_bits) == (3, 2)
    model(torch.randn(2, 1, 8, 8))
    assert model.stem.act_quant.signed is True and model.body[1].act_quant.signed is False


def test_quantize_multi_branch_skip_and_plan():
    model = quantize(Net(), multi_branch=(2, 4), skip=["head"], bits={"body.1": 5})
    assert isinstance(model.body[1], MultiBranchQConv2d) and model.body[1].w_bits == 5
    assert type(model.head) is nn.Linear and isinstance(model.stem, QConv2d)
    with pytest.raises(ValueError, match="bits"):
        quantize(Net(), bits={"nope": 4})
    with pytest.raises(ValueError, match="w_bits"):
        quantize(Net(), w_bits=1)


def _lsq_to_reference(model):
    """The inverse of swap_fused for LSQQuantizer: the plain-PyTorch module with the same step."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LSQQuantizer):
            ref = ReferenceLSQ.from_lsq(module)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ref)
    return model


@pytest.mark.parametrize("model_name", ["small_cnn", "mobilenet_v2", "mobilenet_v3_small", "resnet18"])
def test_swap_fused_keeps_outputs_and_gradients_of_reference_lsq_models(model_name):
    from lowbit.models import create_model

    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_channels": 1}
    if model_name != "small_cnn":
        kwargs.update(small_input=True, width_mult=0.25)
    model = quantize(create_model(model_name, **kwargs)).eval()
    x = torch.randn(2, 1, 8, 8)
    model(x)  # initialise the steps
    reference = _lsq_to_reference(copy.deepcopy(model))
    fused = copy.deepcopy(reference)
    report = swap_fused(fused)
    n_quantizers = sum(isinstance(m, ReferenceLSQ) for m in reference.modules())
    assert len(report.swapped) == n_quantizers > 0 and not any(isinstance(m, ReferenceLSQ) for m in fused.modules())
    want, got = reference(x), fused(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    want.square().sum().backward()
    got.square().sum().backward()
    for (name, p_ref), (_, p_fused) in zip(reference.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_swap_fused_torch_ao_fake_quantize_per_tensor_and_per_channel():
    from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, default_per_channel_weight_fake_quant

    model = nn.Sequential(
        FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=15, dtype=torch.quint8),
        default_per_channel_weight_fake_quant(),
        FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8),
    )
    fused = copy.deepcopy(model)
    report = swap_fused(fused)
    assert [s[2] for s in report.swapped] == ["FusedFakeQuantize", "FusedFakeQuantize"]
    assert report.kept and "range [-127, 127]" in str(report)
    x = torch.randn(6, 9)
    for original, swapped in zip(model, fused, strict=True):  # each on the same input: no chained rounding
        for _ in range(3):  # observers update on every call, in both
            want, got = original(x), swapped(x)
        # torch rounds x * (1/scale) + zero_point, lowbit (x + zero_point * scale) / scale: an ulp apart
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert isinstance(fused[0], FusedFakeQuantize)


def test_swap_fused_learnable_fake_quantize_forward_values():
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver

    fq = _LearnableFakeQuantize(
        MovingAverageMinMaxObserver, quant_min=0, quant_max=255, scale=0.05, zero_point=0.0, use_grad_scaling=True
    )
    fq.toggle_qparam_learning(True).toggle_fake_quant(True).toggle_observer_update(False)
    model = nn.Sequential(fq)
    fused = copy.deepcopy(model)
    swap_fused(fused)
    x = torch.rand(4, 33) * 10
    torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-6)


# ---- BOPs ----------------------------------------------------------------------------------------------------


def test_bops_of_a_hand_counted_network():
    model = quantize(Net(), w_bits=4, a_bits=2, first_last_bits=8)
    report = bops(model, torch.randn(1, 1, 8, 8))
    # stem: 8 out ch * 8*8 positions * 1 in ch * 9 = 4608 MACs, 8x8 bits
    # body conv: 8 * 64 * 8 * 9 = 36864 MACs at 4x2; head: 8*10 = 80 MACs at 8x8
    assert [layer.macs for layer in report.layers] == [4608, 36864, 80]
    assert report.total_bops == 4608 * 64 + 36864 * 8 + 80 * 64
    assert report.avg_a_bits == pytest.approx((4608 * 8 + 36864 * 2 + 80 * 8) / (4608 + 36864 + 80))
    assert "total" in str(report) and report.to_dict()["total_macs"] == 41552


def test_expected_bops_of_multi_branch_model_follows_alpha():
    model = quantize(Net(), multi_branch=(2, 8))
    macs = layer_macs(model, torch.randn(1, 1, 8, 8))
    low = expected_bops(model, macs)
    # alpha = 0: the body conv's expected bits are (2 + 8) / 2; stem and head fixed at 8x8
    assert float(low.detach()) == pytest.approx(4608 * 64 + 36864 * 4 * 5 + 80 * 64)
    with torch.no_grad():
        model.body[1].act_quant.alpha.copy_(torch.tensor([0.0, 10.0]))
    assert expected_bops(model, macs) > low


def test_expected_bops_rejects_a_table_of_another_model():
    model = quantize(Net(), multi_branch=(2, 8))
    with pytest.raises(ValueError, match="not convs or linears"):
        expected_bops(model, {"body.1": 100, "nope": 5})
    with pytest.raises(TypeError, match="macs must be a mapping"):
        expected_bops(model, [100])


def test_bops_has_no_side_effect_on_the_model():
    model = quantize(Net(), w_bits=4, a_bits=2)
    model.train()
    model.body.eval()  # a mixed-mode model keeps each module's own mode
    before = copy.deepcopy(model.state_dict())
    report = bops(model, torch.randn(1, 1, 8, 8))
    assert report.total_macs == 4608 + 36864 + 80
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert not any(hasattr(m, "macs") for m in layers)
    assert not any(m._forward_hooks for m in model.modules())
    assert model.training and not model.body.training and model.stem.training
    # LSQ steps stay uninitialised: training starts them from its first batch, not from the example
    assert not any(m.act_quant.initialized or m.weight_quant.initialized for m in layers)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


def test_weight_bytes_use_the_packed_containers():
    assert weight_bytes((3, 10)) == 120  # float32
    assert weight_bytes((3, 10), 4) == 3 * 5  # two codes a byte
    assert weight_bytes((3, 10), 3) == 3 * 5  # 3 bits live in a 4-bit container
    assert weight_bytes((3, 10), 2) == 3 * 3  # four a byte, each row padded to whole bytes
    assert weight_bytes((3, 10), 5) == 3 * 10
    assert weight_bytes((10, 3, 3, 3), 4) == 10 * 14  # a conv: K = 3 * 3 * 3 = 27 codes a row
    with pytest.raises(ValueError, match="bits must be 32"):
        weight_bytes((3, 10), 9)
    with pytest.raises(ValueError, match="shape must be"):
        weight_bytes((), 4)


def test_model_bytes_float_own_bits_and_a_plan():
    model = Net()
    stem, body, head = 8 * 9, 8 * 8 * 9, 10 * 8  # weight elements
    assert model_bytes(model) == 4 * (stem + body + head)
    quantize(model, w_bits=4, a_bits=2, first_last_bits=8)
    assert model_bytes(model) == 8 * 9 + 8 * 36 + 10 * 8  # stem and head at 8 bits, the body at 4
    assert model_bytes(model, 32) == 4 * (stem + body + head)
    assert model_bytes(model, {"body.1": 2}) == 8 * 9 + 8 * 18 + 10 * 8
    with pytest.raises(ValueError, match="not convs or linears"):
        model_bytes(model, {"nope": 4})
    assert ideal_weight_bytes({"a": 10, "b": 3}, {"a": 4, "b": 3}) == (40 + 9) / 8
    steps = 3 + 8 + 8 + 10  # LSQ steps: one for each input, one per output channel for each weight
    assert float_parameter_bytes(model) == 4 * (stem + body + head + 8 + 8 + 10 + steps)


def test_bops_leaves_batch_norm_statistics_and_mode_alone():
    from lowbit.models import create_model

    model = create_model("mobilenet_v2", num_classes=10, small_input=True, width_mult=0.25, in_channels=1)
    lowbit.quantize(model, w_bits=4, a_bits=4)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    report = lowbit.bops(model, torch.randn(1, 1, 8, 8))  # batch of one on 1x1 maps: fine in eval mode
    assert model.training and report.total_bops > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
