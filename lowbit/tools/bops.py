"""The cost model of SPEC section 3: MACs, bit operations (BOPs) and average bits of a model.

    MACs(conv)   = out_elements_per_sample * (C_in / groups) * kH * kW
    MACs(linear) = out_features * in_features (per sample, per token)
    BOPs(layer)  = MACs * b_w * b_a            (expected b_a = sum_i p_i b_i for multi-branch layers)
    average activation bits = sum_l MACs_l * b_a,l / sum_l MACs_l

Float layers count as 32-bit weights and activations.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lowbit.nn.layers import MultiBranchQConv2d, MultiBranchQLinear, QConv2d, QLinear, _conv_macs, _linear_macs

FLOAT_BITS = 32


@dataclass
class LayerCost:
    name: str
    kind: str
    macs: int
    w_bits: float
    a_bits: float
    params: int

    @property
    def bops(self) -> float:
        return self.macs * self.w_bits * self.a_bits


@dataclass
class BopsReport:
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def total_bops(self) -> float:
        return sum(layer.bops for layer in self.layers)

    @property
    def avg_a_bits(self) -> float:
        return sum(layer.macs * layer.a_bits for layer in self.layers) / max(self.total_macs, 1)

    @property
    def avg_w_bits(self) -> float:
        """Parameter-weighted: the average bits of a stored weight."""
        params = sum(layer.params for layer in self.layers)
        return sum(layer.params * layer.w_bits for layer in self.layers) / max(params, 1)

    def to_dict(self) -> dict:
        return {
            "layers": [{**asdict(layer), "bops": layer.bops} for layer in self.layers],
            "total_macs": self.total_macs,
            "total_bops": self.total_bops,
            "avg_a_bits": self.avg_a_bits,
            "avg_w_bits": self.avg_w_bits,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'type':<20} {'MACs':>12} {'w bits':>7} {'a bits':>7} {'BOPs':>14}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}}  {layer.kind:<20} {layer.macs:>12,} {layer.w_bits:>7.2f} "
                f"{layer.a_bits:>7.2f} {layer.bops:>14,.0f}"
            )
        lines.append(
            f"{'total':<{width}}  {'':<20} {self.total_macs:>12,} {self.avg_w_bits:>7.2f} "
            f"{self.avg_a_bits:>7.2f} {self.total_bops:>14,.0f}"
        )
        return "\n".join(lines)


def _bits_of(module: nn.Module) -> tuple[float, float]:
    if isinstance(module, (MultiBranchQConv2d, MultiBranchQLinear)):
        return float(module.w_bits), float(module.expected_bits().detach())
    if isinstance(module, (QConv2d, QLinear)):
        return float(module.w_bits), float(module.a_bits or FLOAT_BITS)
    return float(FLOAT_BITS), float(FLOAT_BITS)


def bops(model: nn.Module, example_input: torch.Tensor) -> BopsReport:
    """Runs ``model(example_input)`` once (eval mode, no grad) and returns the per-layer cost table, per sample."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    report, hooks = BopsReport(), []

    def record(name):
        def hook(module, inputs, output):
            macs = _conv_macs(module, output) if isinstance(module, nn.Conv2d) else _linear_macs(module, inputs[0])
            if getattr(module, "macs", None) is None and isinstance(module, (QConv2d, QLinear)):
                module.macs = macs
            w_bits, a_bits = _bits_of(module)
            report.layers.append(LayerCost(name, type(module).__name__, macs, w_bits, a_bits, module.weight.numel()))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(record(name)))
    was_training = model.training
    model.eval()  # counting must not move batch-norm statistics (and a batch of one must work)
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return report


def expected_bops(model: nn.Module) -> torch.Tensor:
    """Sum of the layers' BOPs with multi-branch layers at their expected bits, differentiable in every alpha.

    Layers need their MACs (one forward pass, or ``bops``) first.
    """
    total = None
    for module in model.modules():
        if isinstance(module, (MultiBranchQConv2d, MultiBranchQLinear)):
            cost = module.expected_bops()
        elif isinstance(module, (QConv2d, QLinear, nn.Conv2d, nn.Linear)):
            if getattr(module, "macs", None) is None:
                continue
            w_bits, a_bits = _bits_of(module)
            cost = torch.tensor(module.macs * w_bits * a_bits)
        else:
            continue
        total = cost if total is None else total + cost
    if total is None:
        raise RuntimeError("expected_bops found no layer with known MACs: run one forward pass (or lowbit.bops) first")
    return total
