"""Bit selection after the search: argmax of each layer's alpha, then budget repair (SPEC section 8).

Repair lowers, one candidate step at a time, the layer whose next-lower width saves the most BOPs per unit of
alpha margin (``alpha[current] - alpha[lower]``, the log-probability the search gives up), until the total is
at or under the target; it stops at the first such assignment. A single lowering can save much more than the
excess, and the argmax of a search that controlled *expected* BOPs can land well under the target, so ``fill``
then raises layers (least alpha margin given up first, a raise the search prefers first of all) while the total
stays at or under the target:

* ``"both"`` (default): fill after a repair and after an argmax under the target: the selection spends the
  budget it was given, from below;
* ``"repair"``: fill only after a repair (an argmax under the target is kept as the search chose it);
* ``"none"``: argmax, then lower until at or under the target (SPEC section 8's rule).

``repair=False`` skips the lowering: the argmax as it is, the paper's own rule (it may end over the target; the
report shows by how much). Repair and fill are the project's extensions beyond the paper.

The selection keeps the argmax BOPs, so a report shows how far the raw argmax was from the target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.metamix.cost import CostModel, multi_branch_layers
from lowbit.tools.bops import layer_bops

FILL = ("both", "repair", "none")


@dataclass
class LayerChoice:
    name: str
    macs: int
    w_bits: int
    candidates: list[int]
    alpha: list[float]
    probs: list[float]
    argmax_bits: int
    bits: int


@dataclass
class Selection:
    layers: list[LayerChoice]
    target_bops: float
    argmax_bops: float
    bops: float
    repaired: bool

    @property
    def bits(self) -> dict[str, int]:
        return {layer.name: layer.bits for layer in self.layers}

    def to_dict(self) -> dict:
        return {**asdict(self), "bits": self.bits}

    @classmethod
    def from_dict(cls, data: dict) -> Selection:
        layers = [LayerChoice(**layer) for layer in data["layers"]]
        return cls(layers, data["target_bops"], data["argmax_bops"], data["bops"], data["repaired"])


def select(
    cost: CostModel,
    alphas: dict[str, list[float]],
    candidates: dict[str, list[int]],
    target: float,
    fill: str = "both",
    repair: bool = True,
) -> Selection:
    """Argmax (+ repair + fill) on plain numbers: ``alphas[name][i]`` is the logit of ``candidates[name][i]``."""
    order = {name: sorted(range(len(c)), key=lambda i, c=c: c[i]) for name, c in candidates.items()}
    bits = {layer.name: candidates[layer.name][_argmax(alphas[layer.name])] for layer in cost.layers}
    argmax_bops = cost.bops(bits)
    if fill not in FILL:
        raise ValueError(f"fill must be one of {FILL}, got {fill!r}")
    repaired = repair and argmax_bops > target
    if repaired:
        _lower_until(cost, bits, alphas, candidates, order, target)
    if (fill == "both" and cost.bops(bits) <= target) or (fill == "repair" and repaired):
        _raise_while(cost, bits, alphas, candidates, order, target)
    layers = [
        LayerChoice(
            layer.name,
            layer.macs,
            layer.w_bits,
            list(candidates[layer.name]),
            [float(a) for a in alphas[layer.name]],
            _softmax(alphas[layer.name]),
            candidates[layer.name][_argmax(alphas[layer.name])],
            bits[layer.name],
        )
        for layer in cost.layers
    ]
    return Selection(layers, float(target), float(argmax_bops), float(cost.bops(bits)), repaired)


def select_from_model(
    model: nn.Module, cost: CostModel, target: float, fill: str = "both", repair: bool = True
) -> Selection:
    """``select`` on the alphas of a multi-branch model."""
    alphas, candidates = {}, {}
    for name, layer in multi_branch_layers(model):
        alphas[name] = layer.act_quant.alpha.detach().cpu().tolist()
        candidates[name] = list(layer.act_quant.bits)
    return select(cost, alphas, candidates, target, fill, repair)


def _neighbour(name, bits, candidates, order, direction: int) -> int | None:
    """Index (into candidates[name]) of the next width below (-1) or above (+1) the current one, if any."""
    ranked = order[name]
    pos = ranked.index(candidates[name].index(bits[name])) + direction
    return ranked[pos] if 0 <= pos < len(ranked) else None


def _lower_until(cost, bits, alphas, candidates, order, target) -> None:
    while cost.bops(bits) > target:
        best = None
        for layer in cost.layers:
            j = _neighbour(layer.name, bits, candidates, order, -1)
            if j is None:
                continue
            i = candidates[layer.name].index(bits[layer.name])
            saving = layer_bops(layer.macs, layer.w_bits, bits[layer.name] - candidates[layer.name][j])
            margin = alphas[layer.name][i] - alphas[layer.name][j]
            score = math.inf if margin <= 0 else saving / margin
            key = (score, saving)
            if best is None or key > best[0]:
                best = (key, layer.name, j)
        if best is None:
            raise ValueError(f"target of {target:,.0f} BOPs is unreachable: every searched layer is at its minimum")
        bits[best[1]] = candidates[best[1]][best[2]]


def _raise_while(cost, bits, alphas, candidates, order, target) -> None:
    while True:
        total, best = cost.bops(bits), None
        for layer in cost.layers:
            j = _neighbour(layer.name, bits, candidates, order, +1)
            if j is None:
                continue
            extra = layer_bops(layer.macs, layer.w_bits, candidates[layer.name][j] - bits[layer.name])
            if total + extra > target:
                continue
            i = candidates[layer.name].index(bits[layer.name])
            key = (alphas[layer.name][i] - alphas[layer.name][j], -extra)  # least margin given up, then biggest
            if best is None or key < best[0]:
                best = (key, layer.name, j)
        if best is None:
            return
        bits[best[1]] = candidates[best[1]][best[2]]


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _softmax(values: list[float]) -> list[float]:
    return torch.softmax(torch.tensor(values, dtype=torch.float64), dim=0).tolist()
