"""The one cost model (SPEC sections 3 and 4): MACs, bit operations (BOPs), average bits and weight bytes.

    MACs(conv)   = out_elements_per_sample * (C_in / groups) * kH * kW
    MACs(linear) = out_features * in_features (per sample, per token)
    BOPs(layer)  = MACs * b_w * b_a            (expected b_a = sum_i p_i b_i for multi-branch layers)
    average activation bits = sum_l MACs_l * b_a,l / sum_l MACs_l

Float layers count as 32-bit weights and activations. Nothing here writes to a module: MACs are measured by
forward hooks that are removed afterwards, and every caller that needs them again (MetaMix's budget) keeps the
``{layer_name: macs}`` table that ``layer_macs`` returns.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lowbit.core.packing import CONTAINER_BITS, packed_width
from lowbit.nn.layers import MultiBranchQConv2d, MultiBranchQLinear, QConv2d, QLinear

FLOAT_BITS = 32
FLOAT_BYTES = FLOAT_BITS // 8
MULTI_BRANCH = (MultiBranchQConv2d, MultiBranchQLinear)

# ----------------------------------------------------------------------------------------------- MACs


def conv_macs(layer: nn.Conv2d, output: torch.Tensor) -> int:
    """MACs per sample of ``layer`` for its (batched) ``output``."""
    kh, kw = layer.kernel_size
    return math.prod(output.shape[1:]) * (layer.in_channels // layer.groups) * kh * kw


def linear_macs(layer: nn.Linear, x: torch.Tensor) -> int:
    """MACs per sample of ``layer`` for its (batched) input ``x``: every token of a sample counts."""
    tokens = math.prod(x.shape[1:-1]) if x.dim() > 2 else 1
    return tokens * layer.in_features * layer.out_features


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """``{layer_name: MACs per sample}`` of every conv and linear that ``model(example_input)`` runs, in the order
    they first run (a layer that runs twice counts twice).

    The forward runs on a copy of ``model`` in eval mode without grad, so nothing of ``model`` changes: not its
    modes, batch-norm statistics or hooks, and not the LSQ steps, which a first forward would initialise from
    ``example_input`` (training must start them from real data). The copy costs the model's memory once more."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    table: dict[str, int] = {}

    def record(name: str):
        def hook(module, inputs, output):
            macs = conv_macs(module, output) if isinstance(module, nn.Conv2d) else linear_macs(module, inputs[0])
            table[name] = table.get(name, 0) + macs

        return hook

    probe = copy.deepcopy(model).eval()  # eval: a batch of one works and no statistic moves
    for name, module in probe.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(record(name))
    with torch.no_grad():
        probe(example_input)
    return table


# ----------------------------------------------------------------------------------------------- BOPs and bits


def layer_bits(module: nn.Module) -> tuple[float, float]:
    """``(w_bits, a_bits)`` of a conv or linear: the expected activation bits of a multi-branch layer (a number,
    not differentiable), 32 for what stays float."""
    if isinstance(module, MULTI_BRANCH):
        return float(module.w_bits), float(module.expected_bits().detach())
    if isinstance(module, (QConv2d, QLinear)):
        return float(module.w_bits), float(module.a_bits or FLOAT_BITS)
    return float(FLOAT_BITS), float(FLOAT_BITS)


def layer_bops(macs: int, w_bits: float, a_bits: float | torch.Tensor):
    """``MACs * b_w * b_a``; with ``a_bits = sum_i p_i b_i`` (a tensor) the expected BOPs, differentiable in it."""
    return macs * w_bits * a_bits


def average_bits(bits: Iterable[float], weights: Iterable[float]) -> float:
    """``sum_l w_l * b_l / sum_l w_l`` (0 for no weight): MAC-weighted for activations (SPEC section 3),
    parameter-weighted for stored weights."""
    pairs = list(zip(bits, weights, strict=True))
    return sum(w * b for b, w in pairs) / max(sum(w for _, w in pairs), 1)


def expected_bops(model: nn.Module, macs: Mapping[str, int]) -> torch.Tensor:
    """Summed BOPs of the layers named in ``macs`` (a ``layer_macs`` table), multi-branch layers at their expected
    bits: a tensor differentiable in every alpha."""
    if not isinstance(macs, Mapping):
        raise TypeError(f"macs must be a mapping {{layer_name: MACs}} (see layer_macs), got {type(macs).__name__}")
    total, found = None, set()
    for name, module in model.named_modules():
        if name not in macs or not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if isinstance(module, MULTI_BRANCH):
            cost = layer_bops(macs[name], module.w_bits, module.expected_bits())
        else:
            cost = torch.tensor(layer_bops(macs[name], *layer_bits(module)))
        total = cost if total is None else total + cost
        found.add(name)
    missing = sorted(set(macs) - found)
    if missing or total is None:
        raise ValueError(f"macs names layers that are not convs or linears of the model: {missing or '(none given)'}")
    return total


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
        return layer_bops(self.macs, self.w_bits, self.a_bits)


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
        return average_bits([x.a_bits for x in self.layers], [x.macs for x in self.layers])

    @property
    def avg_w_bits(self) -> float:
        """Parameter-weighted: the average bits of a stored weight."""
        return average_bits([x.w_bits for x in self.layers], [x.params for x in self.layers])

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


def bops(model: nn.Module, example_input: torch.Tensor) -> BopsReport:
    """Runs ``model(example_input)`` once (eval mode, no grad, see ``layer_macs``) and returns the per-layer cost
    table, per sample. Leaves the model as it found it."""
    report = BopsReport()
    for name, macs in layer_macs(model, example_input).items():
        module = model.get_submodule(name)
        w_bits, a_bits = layer_bits(module)
        report.layers.append(LayerCost(name, type(module).__name__, macs, w_bits, a_bits, module.weight.numel()))
    return report


# ----------------------------------------------------------------------------------------------- bytes


def weight_bytes(shape: Sequence[int], bits: int = FLOAT_BITS) -> int:
    """Bytes of a weight of ``shape`` (output channels first): float32 at 32 bits; else its integer codes packed
    along the rest (``K = prod(shape[1:])``) in SPEC section 4's containers (3 bits in 4, 5..7 in 8), each of the
    ``shape[0]`` rows padded to whole bytes: what a converted model stores for it."""
    shape = tuple(shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"shape must be a non-empty sequence of sizes >= 0, got {shape}")
    if bits == FLOAT_BITS:
        return math.prod(shape) * FLOAT_BYTES
    if bits not in CONTAINER_BITS:
        raise ValueError(f"bits must be {FLOAT_BITS} (float) or one of {sorted(CONTAINER_BITS)}, got {bits!r}")
    return shape[0] * packed_width(math.prod(shape[1:]), bits)


def model_bytes(model: nn.Module, bits: int | Mapping[str, int] | None = None) -> int:
    """Weight bytes of every conv and linear of ``model`` (see ``weight_bytes``). ``bits``: ``None`` stores each
    layer at its own weight bits (32 for float layers: the float size of a float model, the packed size a
    quantized model converts to); an int stores every layer at that width (32: the float size of any model); a
    mapping ``{layer_name: bits}`` (a MixQuant plan) overrides the named layers."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(layers))
        if unknown:
            raise ValueError(f"bits names layers that are not convs or linears of the model: {unknown}")
    total = 0
    for name, layer in layers.items():
        own = int(layer_bits(layer)[0])
        width = bits.get(name, own) if isinstance(bits, Mapping) else own if bits is None else bits
        total += weight_bytes(layer.weight.shape, width)
    return total


def float_parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter of ``model`` (weights, biases, norms, steps) as float32."""
    return sum(p.numel() for p in model.parameters()) * FLOAT_BYTES


def ideal_weight_bytes(params: Mapping[str, int], bits: Mapping[str, float]) -> float:
    """``sum_l n_l * b_l / 8`` over the layers in ``bits``: weights at exactly ``b_l`` bits each, without containers
    or row padding (MixQuant's ``ModelBytes`` budget measures this; ``weight_bytes`` is what a file holds)."""
    return sum(params[name] * b for name, b in bits.items()) / 8
