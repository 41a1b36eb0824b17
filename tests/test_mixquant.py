"""MixQuant: the QE table, the QEM rule and the budget search (SPEC section 7)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lowbit import mixquant as mq
from lowbit.mixquant.table import QETable


def _linear_with(weight: torch.Tensor) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return nn.Sequential(layer)


def test_qe_of_hand_made_weights():
    # Row max 1 -> step 1/Qp. Values 0, 1 are exact at every width; 0.5 sits on a tie at 2 bits (Qp = 1):
    # round(0.5) = 0, error 0.25. At 3 bits (Qp = 3) 0.5 * 3 = 1.5 rounds to 2 -> 2/3, error (1/6)^2.
    w = torch.tensor([[1.0, 0.0, 0.5, -1.0]])
    table = mq.qe_table(_linear_with(w), bits=[2, 3, 8])
    assert table.error("0", 2) == pytest.approx(0.25 / 4)
    assert table.error("0", 3) == pytest.approx((1 / 6) ** 2 / 4)
    assert table.params == {"0": 4}


def test_qem_rule_picks_the_fewest_bits_within_the_multiplier():
    table = QETable(
        bits=[2, 3, 4, 8], qe={"a": [64.0, 16.0, 4.0, 1.0], "b": [2.0, 1.5, 1.0, 1.0]}, params={"a": 10, "b": 10}
    )
    assert dict(mq.search(table, qem=1)) == {"a": 8, "b": 4}
    assert dict(mq.search(table, qem=4)) == {"a": 4, "b": 2}
    assert dict(mq.search(table, qem=20)) == {"a": 3, "b": 2}


def _brute_force(table: QETable, capacity: float) -> float:
    best = float("inf")
    names = table.layers
    for combo in itertools.product(table.bits, repeat=len(names)):
        cost = sum(table.params[n] * b for n, b in zip(names, combo, strict=True))
        if cost <= capacity:
            best = min(best, sum(table.params[n] * table.error(n, b) for n, b in zip(names, combo, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg", [2.5, 3.0, 4.0, 5.5])
def test_budget_is_respected_near_optimal_and_never_worse_than_uniform(seed, avg):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        *[nn.Linear(int(s), int(t), bias=False) for s, t in torch.randint(3, 40, (5, 2), generator=gen)]
    )
    for layer in model:
        nn.init.normal_(layer.weight, std=float(torch.rand(1, generator=gen)) + 0.1)
    table = mq.qe_table(model, bits=[2, 3, 4, 6, 8])
    plan = mq.search(table, budget=mq.AvgBits(avg))
    total_params = sum(table.params.values())
    assert plan.avg_bits <= avg + 1e-9 and plan.model_bytes <= avg * total_params / 8 + 1e-6
    optimum = _brute_force(table, avg * total_params)
    assert optimum - 1e-9 <= plan.total_qe <= optimum + plan.gap_bound + 1e-9
    for b in table.bits:
        if b <= avg:
            uniform = sum(table.params[n] * table.error(n, b) for n in table.layers)
            assert plan.total_qe <= uniform + 1e-12


def test_model_bytes_budget_and_plan_on_every_packaged_model():
    from lowbit.models import create_model

    for name in ["small_cnn", "mobilenet_v2", "mobilenet_v3_small", "resnet18"]:
        kwargs = {} if name == "small_cnn" else {"width_mult": 0.25, "small_input": True}
        model = create_model(name, num_classes=10, **kwargs)
        table = mq.qe_table(model)
        plan = mq.search(table, budget=mq.ModelBytes(sum(table.params.values()) * 3 / 8))
        assert plan.model_bytes <= sum(table.params.values()) * 3 / 8 + 1e-6
        assert set(plan) == set(table.layers)
        import lowbit

        lowbit.quantize(model, bits=dict(plan), first_last_bits=None)  # a plan applies to the model as is


@pytest.mark.parametrize(
    "call, exc, argument",
    [
        (lambda t: mq.search(t, qem=0.5), ValueError, "qem"),
        (lambda t: mq.search(t, qem="2"), TypeError, "qem"),
        (lambda t: mq.search(t), ValueError, "qem"),
        (lambda t: mq.search(t, qem=2, budget=mq.AvgBits(3)), ValueError, "budget"),
        (lambda t: mq.search(t, budget=mq.AvgBits(1.5)), ValueError, "budget"),
        (lambda t: mq.search(t, budget=3.0), TypeError, "budget"),
        (lambda t: mq.qe_table(nn.Sequential(nn.Linear(3, 3)), bits=[]), ValueError, "bits"),
        (lambda t: mq.qe_table("model"), TypeError, "model"),
        (lambda t: mq.qe_table(nn.Sequential(nn.ReLU())), ValueError, "model"),
    ],
    ids=[
        "qem-below-1",
        "qem-str",
        "neither",
        "both",
        "budget-below-2-bit",
        "budget-float",
        "empty-bits",
        "model-str",
        "no-layers",
    ],
)
def test_bad_input(call, exc, argument):
    table = mq.qe_table(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(exc, match=argument):
        call(table)


def test_minmax_ptq_applies_a_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    original = [m.weight.detach().clone() for m in (model[0], model[2])]
    mq.MinMaxPTQ().apply(model, {"0": 2, "2": 8})
    assert torch.unique(model[0].weight[0]).numel() <= 4  # 2 bits: at most four levels per channel
    assert (model[2].weight - original[1]).abs().max() <= (original[1].amax(1) - original[1].amin(1)).max() / 255
    assert not torch.equal(model[0].weight, original[0])
    with pytest.raises(ValueError, match="plan"):
        mq.MinMaxPTQ().apply(model, {"nope": 4})
