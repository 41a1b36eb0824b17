"""From a QE table to per-layer bits: the QEM rule of SPEC section 7, or the best plan under a size budget."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from lowbit.core import checks
from lowbit.mixquant.table import QETable, qe_table
from lowbit.tools.bops import average_bits, ideal_weight_bytes


@dataclass(frozen=True)
class AvgBits:
    """Budget: parameter-weighted average weight bits at most ``bits``."""

    bits: float


@dataclass(frozen=True)
class ModelBytes:
    """Budget: weight storage at most ``n`` bytes (``bits / 8`` per parameter)."""

    n: float


@dataclass
class Plan(Mapping):
    """``{layer_name: bits}`` with what it costs: a read-only mapping any quantizer can take."""

    bits: dict[str, int]
    qe: dict[str, float]  # the layer's QE at its chosen width
    params: dict[str, int]
    gap_bound: float | None = field(default=None)  # budget mode: summed QE is at most this above the optimum

    def __getitem__(self, layer: str) -> int:
        return self.bits[layer]

    def __iter__(self):
        return iter(self.bits)

    def __len__(self) -> int:
        return len(self.bits)

    @property
    def avg_bits(self) -> float:
        """Parameter-weighted average weight bits."""
        return average_bits(self.bits.values(), [self.params[n] for n in self.bits])

    @property
    def model_bytes(self) -> float:
        """Weight storage at exactly the plan's bits (no containers): what a ``ModelBytes`` budget bounds."""
        return ideal_weight_bytes(self.params, self.bits)

    @property
    def total_qe(self) -> float:
        """Summed size-weighted QE, ``sum_l n_l * QE(l, b_l)``: what the budget mode minimises."""
        return sum(self.params[n] * self.qe[n] for n in self.bits)

    def __str__(self) -> str:
        width = max([len(n) for n in self.bits] + [5])
        rows = [f"{'layer':<{width}} {'params':>10} {'bits':>5} {'QE':>10}"]
        rows += [f"{n:<{width}} {self.params[n]:>10,} {b:>5} {self.qe[n]:>10.3e}" for n, b in self.bits.items()]
        rows.append(f"average bits {self.avg_bits:.3f}, weight bytes {self.model_bytes:,.0f}")
        return "\n".join(rows)


def _plan(table: QETable, bits: dict[str, int], gap_bound: float | None = None) -> Plan:
    qe = {n: table.error(n, b) for n, b in bits.items()}
    return Plan(bits=bits, qe=qe, params=dict(table.params), gap_bound=gap_bound)


def uniform_plan(model, bits: int, *, quantizer=None) -> Plan:
    """Every layer at ``bits``: the baseline a MixQuant plan is compared with (``model`` or a ``QETable``)."""
    bits = checks.bits("bits", bits)
    table = model if isinstance(model, QETable) else qe_table(_module(model), [bits], quantizer)
    if bits not in table.bits:
        raise ValueError(f"bits={bits} is not a width of the QE table {table.bits}")
    return _plan(table, dict.fromkeys(table.layers, bits))


def search(model, *, qem: float | None = None, budget=None, base_bits: int = 8, bits=range(2, 9), quantizer=None):
    """Per-layer weight bits for ``model`` (an ``nn.Module`` or a ``QETable`` already computed).

    Exactly one of:
        qem: the QEM rule, ``b_l = min{b : QE(l, b) <= qem * QE(l, base_bits)}``, ``qem >= 1``.
        budget: ``AvgBits(a)`` or ``ModelBytes(n)``; minimises the summed size-weighted QE under it by dynamic
            programming (see ``_under_budget`` for the method and the certified ``Plan.gap_bound``).
    """
    if (qem is None) == (budget is None):
        raise ValueError("search needs exactly one of qem (the QEM rule) or budget (AvgBits or ModelBytes)")
    base_bits = checks.bits("base_bits", base_bits)
    widths = sorted(set(checks.bit_list("bits", bits)) | {base_bits})
    table = model if isinstance(model, QETable) else qe_table(_module(model), widths, quantizer)
    if qem is not None:
        return _qem_rule(table, qem, base_bits)
    return _under_budget(table, budget)


def _module(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a QETable, got {type(model).__name__}")
    return model


def _qem_rule(table: QETable, qem: float, base_bits: int) -> Plan:
    if isinstance(qem, bool) or not isinstance(qem, (int, float)) or not math.isfinite(qem):
        raise TypeError(f"qem must be a finite number >= 1, got {qem!r}")
    if qem < 1:
        raise ValueError(f"qem must be >= 1 (1 keeps every layer at base_bits), got {qem}")
    if base_bits not in table.bits:
        raise ValueError(f"base_bits={base_bits} is not a width of the QE table {table.bits}")
    chosen = {}
    for name in table.layers:
        limit = qem * table.error(name, base_bits)
        chosen[name] = min(b for b in table.bits if table.error(name, b) <= limit or b == base_bits)
    return _plan(table, chosen)


def _budget_bits(table: QETable, budget) -> float:
    total = sum(table.params.values())
    if isinstance(budget, AvgBits):
        return budget.bits * total
    if isinstance(budget, ModelBytes):
        return budget.n * 8
    raise TypeError(f"budget must be AvgBits(...) or ModelBytes(...), got {type(budget).__name__}")


def _under_budget(table: QETable, budget, grid: int = 20_000) -> Plan:
    """The plan of least summed size-weighted QE under the budget (a multiple-choice knapsack), by dynamic
    programming over the budget split into ``grid`` cells, each layer's extra storage rounded *up* to whole cells
    (so the plan always fits; cells of one bit, so no rounding, when the spare storage is at most ``grid`` bits).
    The DP is exact for the rounded costs; rounding can cost at most one cell per layer of capacity.
    ``Plan.gap_bound`` certifies the result against the true optimum: it is the plan's summed QE minus the
    LP-relaxation optimum (``_lp_bound``), a lower bound of every plan that fits. The hull greedy and the best
    uniform plan that fits are also tried and the best of the three is returned, so the result is never worse than
    uniform bits at the same budget.
    """
    capacity = _budget_bits(table, budget)
    lowest = min(table.bits)
    floor = sum(n * lowest for n in table.params.values())
    if capacity < floor - 1e-9:
        raise ValueError(f"budget is below the all-{lowest}-bit size ({floor / 8:,.0f} bytes): {budget}")
    candidates = [_dp_plan(table, capacity - floor, grid), _greedy_plan(table, capacity)]
    uniform = [dict.fromkeys(table.layers, b) for b in table.bits]
    candidates += [u for u in uniform if sum(table.params[n] * b for n, b in u.items()) <= capacity + 1e-9]
    plans = [_plan(table, bits) for bits in candidates]
    best = min(plans, key=lambda p: p.total_qe)  # min keeps the first of equals: DP, then greedy, then uniform
    best.gap_bound = max(0.0, best.total_qe - _lp_bound(table, capacity))
    return best


def _dp_plan(table: QETable, spare: float, grid: int) -> dict[str, int]:
    """Exact DP for the knapsack with extra storage ``n_l * (b - lowest)`` rounded up to cells of ``spare / grid``.
    Storage is whole bits (whole parameters at whole widths), so when the spare fits in ``grid`` cells of one bit
    nothing is rounded and the DP is exact."""
    lowest = min(table.bits)
    if spare <= 1e-9:
        return dict.fromkeys(table.layers, lowest)
    whole_bits = math.floor(spare + 1e-9)  # a fraction of a bit buys nothing
    if whole_bits <= grid:
        grid, unit = whole_bits, 1.0
    else:
        unit = spare / grid
    best = np.zeros(grid + 1)  # least summed QE using at most g cells, over the layers so far
    choices = []
    for name in table.layers:
        n = table.params[name]
        new, pick = np.full(grid + 1, np.inf), np.zeros(grid + 1, dtype=np.int8)
        for j, b in enumerate(table.bits):
            cells = math.ceil(n * (b - lowest) / unit - 1e-9)
            if cells > grid:
                continue
            value = np.full(grid + 1, np.inf)
            value[cells:] = best[: grid + 1 - cells] + n * table.error(name, b)
            better = value < new
            new[better], pick[better] = value[better], j
        best = new
        choices.append(pick)
    chosen, g = {}, grid
    for name, pick in zip(reversed(table.layers), reversed(choices), strict=True):
        b = table.bits[int(pick[g])]
        chosen[name] = b
        g -= math.ceil(table.params[name] * (b - lowest) / unit - 1e-9)
    return {name: chosen[name] for name in table.layers}


def _greedy_plan(table: QETable, capacity: float) -> dict[str, int]:
    """The classic greedy: hull upgrades by QE saved per storage bit, skipping those that no longer fit."""
    lowest = min(table.bits)
    chosen = dict.fromkeys(table.layers, lowest)
    used = sum(n * lowest for n in table.params.values())
    blocked: set[str] = set()
    for _efficiency, name, to_bits, cost, _saving in _hull_upgrades(table):
        if name in blocked or chosen[name] >= to_bits:
            continue
        if used + cost <= capacity + 1e-9:
            chosen[name], used = to_bits, used + cost
        else:
            blocked.add(name)  # its later upgrades build on this one
    return chosen


def _lp_bound(table: QETable, capacity: float) -> float:
    """Optimum of the LP relaxation: hull upgrades in order of efficiency, the first that does not fit taken
    fractionally (each layer's hull is convex, so this order respects every layer's own order). No plan that fits
    has a smaller summed QE."""
    lowest = min(table.bits)
    value = sum(n * table.error(name, lowest) for name, n in table.params.items())
    room = capacity - sum(n * lowest for n in table.params.values())
    for _efficiency, _name, _to_bits, cost, saving in _hull_upgrades(table):
        if room <= 0:
            break
        take = min(1.0, room / cost)
        value, room = value - take * saving, room - take * cost
    return value


def _hull_upgrades(table: QETable) -> list[tuple[float, str, int, float, float]]:
    """(QE saved per extra storage bit, layer, new bits, extra bits, QE saved) along each layer's lower hull,
    sorted by efficiency (ties by layer name, for determinism)."""
    upgrades = []
    for name in table.layers:
        n = table.params[name]
        points = [(n * b, n * table.error(name, b), b) for b in table.bits]
        hull = _lower_hull(points)
        for (c0, v0, _), (c1, v1, b1) in zip(hull, hull[1:], strict=False):
            upgrades.append(((v0 - v1) / (c1 - c0), name, b1, c1 - c0, v0 - v1))
    upgrades.sort(key=lambda u: (-u[0], u[1], u[2]))
    return upgrades


def _lower_hull(points):
    """Lower-left convex hull of (cost, value) points sorted by cost, keeping only value-decreasing steps."""
    hull = []
    for p in sorted(points):
        if hull and p[1] >= hull[-1][1]:
            continue  # costs more and saves nothing
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
