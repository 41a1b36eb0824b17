"""The uniform frontier (SPEC section 9) that MixQuant and MetaMix results are judged against."""

from __future__ import annotations

import pytest

from lowbit.app import frontier

UNIFORM = [(3.0, 80.0), (2.0, 50.0), (4.0, 90.0), (8.0, 91.0)]  # (cost, top-1), deliberately unsorted


def test_frontier_interpolates_linearly_between_neighbours():
    assert frontier.frontier_at(UNIFORM, 2.0) == 50.0
    assert frontier.frontier_at(UNIFORM, 2.5) == pytest.approx(65.0)
    assert frontier.frontier_at(UNIFORM, 3.25) == pytest.approx(82.5)
    assert frontier.frontier_at(UNIFORM, 6.0) == pytest.approx(90.5)
    assert frontier.frontier_at(UNIFORM, 8.0) == 91.0


def test_gap_is_signed():
    assert frontier.gap(UNIFORM, 2.5, 70.0) == pytest.approx(5.0)  # above: a win at equal cost
    assert frontier.gap(UNIFORM, 2.5, 60.0) == pytest.approx(-5.0)  # under
    assert frontier.gap(UNIFORM, 3.0, 80.0) == pytest.approx(0.0)  # a uniform point lies on it


def test_frontier_refuses_to_extrapolate_or_bad_points():
    with pytest.raises(ValueError, match="outside"):
        frontier.frontier_at(UNIFORM, 1.5)
    with pytest.raises(ValueError, match="outside"):
        frontier.gap(UNIFORM, 9.0, 90.0)
    assert frontier.frontier_at(UNIFORM, 2.0 * (1 - 1e-12)) == 50.0  # rounding at the end points is tolerated
    with pytest.raises(ValueError, match="at least two"):
        frontier.frontier_at([(2.0, 50.0)], 2.0)
    with pytest.raises(ValueError, match="distinct costs"):
        frontier.frontier_at([(2.0, 50.0), (2.0, 60.0)], 2.0)
    with pytest.raises(ValueError, match="finite"):
        frontier.frontier_at([(2.0, 50.0), (3.0, float("nan"))], 2.0)


def test_mean_std_and_paired_difference():
    assert frontier.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert frontier.mean_std([4.0]) == (4.0, 0.0)
    mean, std = frontier.paired([5.0, 7.0, 9.0], [4.0, 5.0, 6.0])
    assert mean == pytest.approx(2.0) and std == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same seeds"):
        frontier.paired([1.0], [1.0, 2.0])


def test_qe_table_measures_the_quantizer_that_will_be_applied():
    import torch
    from torch import nn

    from lowbit import mixquant as mq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 10))
    with torch.no_grad():
        model[0].weight.add_(0.3)  # a one-sided weight: asymmetric and symmetric errors differ clearly
    asym = mq.qe_table(model, quantizer=mq.MinMaxPTQ())
    assert asym.qe == mq.qe_table(model, quantizer=mq.asymmetric_minmax).qe
    assert mq.qe_table(model, quantizer=mq.BRECQ(torch.zeros(4, 1, 8, 8))).qe == asym.qe  # BRECQ starts from it
    sym = mq.qe_table(model)
    assert mq.qe_table(model, quantizer=mq.LSQFineTune([], epochs=1)).qe == sym.qe
    assert asym.error("0", 2) < sym.error("0", 2)  # min-max uses the whole 2-bit grid on a one-sided weight
    # the error is the one MinMaxPTQ really makes
    applied = mq.MinMaxPTQ().apply(copy_of(model), {"0": 3})
    assert float(((applied[0].weight - model[0].weight) ** 2).mean()) == pytest.approx(asym.error("0", 3), rel=1e-6)
    plan = mq.search(model, budget=mq.AvgBits(3), quantizer=mq.MinMaxPTQ())
    assert plan.qe["0"] == asym.error("0", plan["0"])


def copy_of(model):
    import copy

    return copy.deepcopy(model)
