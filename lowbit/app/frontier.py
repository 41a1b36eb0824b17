"""The uniform frontier of SPEC section 9: is a mixed-precision result above what uniform bits give at its cost?

Uniform quantization at every width (2..8) gives points ``(cost, top-1)``; cost is BOPs (activations, MetaMix) or
model bytes (weights, MixQuant). The frontier is the piecewise-linear curve through those points in cost order, and
a mixed result's *gap* is its top-1 minus the frontier at its own cost: positive above the frontier (a win at equal
cost), negative under it. Over seeds, report the gaps' mean and standard deviation and the paired difference of two
methods on the same seeds (``paired``).

    points = [(bops_at(b), top1_uniform[b]) for b in range(2, 9)]
    gap(points, mixed_bops, mixed_top1)         # signed points of top-1 above (+) / under (-) the frontier
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def _checked(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    pts = sorted((float(c), float(a)) for c, a in points)
    if len(pts) < 2:
        raise ValueError(f"points must hold at least two (cost, top-1) pairs, got {len(pts)}")
    if not all(math.isfinite(c) and math.isfinite(a) for c, a in pts):
        raise ValueError("points must be finite (cost, top-1) pairs")
    costs = [c for c, _ in pts]
    if len(set(costs)) != len(costs):
        raise ValueError(f"points must have distinct costs (one uniform point per width), got {costs}")
    return pts


def frontier_at(points: Sequence[tuple[float, float]], cost: float) -> float:
    """Top-1 of the uniform frontier at ``cost``: linear between the two uniform points around it.

    ``cost`` outside ``[cheapest, dearest]`` raises ``ValueError``: the frontier is not extrapolated.
    """
    pts = _checked(points)
    cost = float(cost)
    lo, hi = pts[0][0], pts[-1][0]
    # a relative tolerance: a plan at exactly the 2-bit cost can land a rounding error below it
    if not (lo * (1 - 1e-9) <= cost <= hi * (1 + 1e-9)):
        raise ValueError(f"cost {cost:,.6g} is outside the frontier's range [{lo:,.6g}, {hi:,.6g}]")
    cost = min(max(cost, lo), hi)
    for (c0, a0), (c1, a1) in zip(pts, pts[1:], strict=False):
        if cost <= c1:
            return a0 + (a1 - a0) * (cost - c0) / (c1 - c0)
    return pts[-1][1]  # pragma: no cover - cost == hi is caught by the loop


def gap(points: Sequence[tuple[float, float]], cost: float, top1: float) -> float:
    """Signed distance of ``(cost, top1)`` above (+) or under (-) the frontier, in top-1 points."""
    return float(top1) - frontier_at(points, cost)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(first: Sequence[float], second: Sequence[float]) -> tuple[float, float]:
    """Mean and standard deviation of ``first[i] - second[i]`` over the same seeds ``i``."""
    if len(first) != len(second):
        raise ValueError(f"paired values need the same seeds: {len(first)} vs {len(second)} values")
    return mean_std([a - b for a, b in zip(first, second, strict=True)])
