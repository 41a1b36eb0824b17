"""The budget side of MetaMix, on the shared cost model (``lowbit.bops``): which layers are searched, what they
and the fixed layers cost, the BOPs target, and the penalty ``r(alpha) = lam * (E[BOPs] / target - 1)^2``.

Everything here is per sample, as ``lowbit.bops`` counts. The first and last layer keep their fixed bits and
enter every total as a constant. The MACs come from one ``lowbit.bops`` measurement, kept in the ``CostModel``
(``macs``); the formula is ``lowbit.tools.bops``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.tools.bops import MULTI_BRANCH, BopsReport, average_bits, bops, expected_bops, layer_bops


def multi_branch_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The searched layers of a multi-branch model, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MULTI_BRANCH)]


def alpha_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every branch-logit vector ``alpha`` of the model: what the bit-search step updates and nothing else."""
    return [m.act_quant.alpha for _, m in multi_branch_layers(model)]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter but the alphas: weights, biases, BN affine and all LSQ steps (the bit-meta step's)."""
    alphas = {id(p) for p in alpha_parameters(model)}
    return [p for p in model.parameters() if id(p) not in alphas]


@dataclass(frozen=True)
class SearchedLayer:
    name: str
    macs: int
    w_bits: int


@dataclass(frozen=True)
class CostModel:
    """Per-sample cost of a model split into the searched layers (bits free) and a fixed rest; ``macs`` holds
    every measured layer's MACs (what ``expected_bops`` and ``penalty`` price the model's alphas with)."""

    layers: tuple[SearchedLayer, ...]
    fixed_bops: float
    macs: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, example: torch.Tensor, searched: list[str]) -> CostModel:
        """Measures ``model`` on ``example`` with ``lowbit.bops`` (one forward in eval mode; the model is left as
        it was)."""
        return cls.from_report(bops(model, example), searched)

    @classmethod
    def from_report(cls, report: BopsReport, searched: list[str]) -> CostModel:
        """The cost model of a ``lowbit.bops`` report, the layers named in ``searched`` free."""
        names = set(searched)
        layers = tuple(SearchedLayer(c.name, c.macs, int(c.w_bits)) for c in report.layers if c.name in names)
        fixed = sum(c.bops for c in report.layers if c.name not in names)
        return cls(layers, float(fixed), {c.name: c.macs for c in report.layers})

    def bops(self, bits: dict[str, int] | float) -> float:
        """Total BOPs with the searched layers at ``bits`` (a map, or one width for all of them)."""
        get = (lambda name: bits[name]) if isinstance(bits, dict) else (lambda name: bits)
        return self.fixed_bops + sum(layer_bops(x.macs, x.w_bits, get(x.name)) for x in self.layers)

    def expected_bops(self, model: nn.Module) -> torch.Tensor:
        """BOPs of ``model`` (the structure this cost model measured) with its multi-branch layers at their
        expected bits, differentiable in every alpha."""
        return expected_bops(model, self.macs)

    def avg_bits(self, bits: dict[str, float]) -> float:
        """Average activation bits of the searched layers, weighted by ``MACs * w_bits`` (what a BOPs budget
        constrains; with one weight width it is SPEC section 3's MAC-weighted average)."""
        return average_bits([bits[x.name] for x in self.layers], [x.macs * x.w_bits for x in self.layers])

    def target(self, target_bits: float | None, target_bops: float | None) -> float:
        """The absolute target: ``target_bops`` as given, or the BOPs with every searched layer at ``target_bits``."""
        return float(target_bops) if target_bops is not None else self.bops(float(target_bits))

    def check_reachable(self, target: float, min_bits: int) -> None:
        floor = self.bops(min_bits)
        if target < floor:
            raise ValueError(
                f"target of {target:,.0f} BOPs is unreachable: every searched layer at {min_bits} bits already "
                f"costs {floor:,.0f} BOPs (raise target_bops/target_bits or add a smaller width to a_bits)"
            )


def penalty(model: nn.Module, cost: CostModel, target: float, lam: float) -> torch.Tensor:
    """``lam * (E[BOPs] / target - 1)^2``, differentiable in every alpha (SPEC section 8); E[BOPs] priced with
    ``cost``'s MACs."""
    return lam * (cost.expected_bops(model) / target - 1.0) ** 2
