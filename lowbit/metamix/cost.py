"""The budget side of MetaMix, on the shared cost model (``lowbit.bops``): which layers are searched, what they
and the fixed layers cost, the BOPs target, and the penalty ``r(alpha) = lam * (E[BOPs] / target - 1)^2``.

Everything here is per sample, as ``lowbit.bops`` counts. The first and last layer keep their fixed bits and
enter every total as a constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowbit.nn.layers import MultiBranchQConv2d, MultiBranchQLinear
from lowbit.tools.bops import bops, expected_bops

MULTI_BRANCH = (MultiBranchQConv2d, MultiBranchQLinear)


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
    """Per-sample cost of a model split into the searched layers (bits free) and a fixed rest."""

    layers: tuple[SearchedLayer, ...]
    fixed_bops: float

    @classmethod
    def of(cls, model: nn.Module, example: torch.Tensor, searched: list[str]) -> CostModel:
        """Measures ``model`` on ``example`` (eval mode, one forward, no state changes) with ``lowbit.bops``."""
        was_training = model.training
        model.eval()
        try:
            report = bops(model, example)
        finally:
            model.train(was_training)
        names = set(searched)
        layers = tuple(SearchedLayer(c.name, c.macs, int(c.w_bits)) for c in report.layers if c.name in names)
        fixed = sum(c.bops for c in report.layers if c.name not in names)
        return cls(layers, float(fixed))

    def bops(self, bits: dict[str, int] | float) -> float:
        """Total BOPs with the searched layers at ``bits`` (a map, or one width for all of them)."""
        get = (lambda name: bits[name]) if isinstance(bits, dict) else (lambda name: bits)
        return self.fixed_bops + sum(layer.macs * layer.w_bits * get(layer.name) for layer in self.layers)

    def avg_bits(self, bits: dict[str, float]) -> float:
        """Average activation bits of the searched layers, weighted by ``MACs * w_bits`` (what a BOPs budget
        constrains; with one weight width it is SPEC section 3's MAC-weighted average)."""
        weight = sum(layer.macs * layer.w_bits for layer in self.layers)
        return sum(layer.macs * layer.w_bits * bits[layer.name] for layer in self.layers) / max(weight, 1)

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


def penalty(model: nn.Module, target: float, lam: float) -> torch.Tensor:
    """``lam * (E[BOPs] / target - 1)^2``, differentiable in every alpha (SPEC section 8)."""
    return lam * (expected_bops(model) / target - 1.0) ** 2
