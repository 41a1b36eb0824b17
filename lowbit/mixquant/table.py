"""The quantization-error table of SPEC section 7."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from lowbit.core import checks
from lowbit.ops import fake_quant, quant_range

QUANTIZABLE = (nn.Conv2d, nn.Linear)


class WeightQuantizer(Protocol):
    """What MixQuant needs of a quantizer: the dequantized weight at ``bits``."""

    def __call__(self, weight: torch.Tensor, bits: int) -> torch.Tensor: ...


class SymmetricPerChannel:
    """SPEC section 7's default: symmetric, per output channel, ``step = max|W| / Qp``, via the fused op."""

    def __call__(self, weight: torch.Tensor, bits: int) -> torch.Tensor:
        w = weight.detach().float()
        qp = quant_range(bits, True)[1]
        step = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-12) / qp
        return fake_quant(w, step, bits, signed=True, axis=0)


@dataclass
class QETable:
    """``qe[layer][i]`` is the mean squared quantization error of ``layer`` at ``bits[i]``."""

    bits: list[int]
    qe: dict[str, list[float]] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.qe)

    def error(self, layer: str, bits: int) -> float:
        return self.qe[layer][self.bits.index(bits)]

    def to_dict(self) -> dict:
        return {"bits": self.bits, "qe": self.qe, "params": self.params}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        width = max([len(n) for n in self.qe] + [5])
        head = f"{'layer':<{width}} {'params':>10} " + " ".join(f"{f'{b}-bit':>10}" for b in self.bits)
        rows = [
            f"{name:<{width}} {self.params[name]:>10,} " + " ".join(f"{v:>10.3e}" for v in values)
            for name, values in self.qe.items()
        ]
        return "\n".join([head, *rows])


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv and linear of ``model`` (lowbit's quantized layers subclass them, so they count too)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZABLE)}


def qe_table(model: nn.Module, bits=range(2, 9), quantizer: WeightQuantizer | None = None) -> QETable:
    """The L x |B| table: one quantize-dequantize pass per layer and width, no per-element Python.

    ``quantizer`` is a callable ``(weight, bits) -> dequantized weight`` or a plan quantizer (``MinMaxPTQ``,
    ``BRECQ``, ``LSQFineTune``...) whose ``qe_quantizer`` is that callable: the table then measures the error of
    the quantizer that will be applied (SPEC section 7). ``None``: symmetric per-channel max|W| steps.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    widths = checks.bit_list("bits", bits)
    quantizer = getattr(quantizer, "qe_quantizer", quantizer) or SymmetricPerChannel()
    if not callable(quantizer):
        raise TypeError(f"quantizer must be callable as quantizer(weight, bits), got {type(quantizer).__name__}")
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("model has no conv or linear layer to quantize")
    table = QETable(bits=sorted(widths))
    with torch.no_grad():
        for name, layer in layers.items():
            w = layer.weight.detach().float()
            table.params[name] = w.numel()
            table.qe[name] = [float(torch.mean((w - quantizer(w, b)) ** 2)) for b in table.bits]
    return table
