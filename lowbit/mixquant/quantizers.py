"""Quantizers that apply a MixQuant plan ``{layer: bits}``.

A quantizer is anything with ``apply(model, plan) -> model``. Provided:
  * ``MinMaxPTQ``: vanilla asymmetric per-channel min-max post-training quantization of the weights;
  * LSQ QAT: ``lowbit.quantize(model, bits=plan)`` then train (the project's layers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn

from lowbit import _checks
from lowbit.mixquant.table import quantizable_layers


class PlanQuantizer(Protocol):
    def apply(self, model: nn.Module, plan: Mapping[str, int]) -> nn.Module: ...


def asymmetric_minmax(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Dequantized weight under per-output-channel asymmetric min-max quantization to ``bits``."""
    w = weight.detach().float()
    flat = w.reshape(w.shape[0], -1)
    lo, hi = flat.amin(dim=1).clamp_max(0), flat.amax(dim=1).clamp_min(0)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(flat / scale[:, None]) + zero[:, None], 0, levels)
    return ((q - zero[:, None]) * scale[:, None]).reshape(w.shape).to(weight.dtype)


class MinMaxPTQ:
    """Replaces each planned layer's weight by its asymmetric per-channel min-max quantization, in place."""

    def apply(self, model: nn.Module, plan: Mapping[str, int]) -> nn.Module:
        layers = quantizable_layers(model)
        unknown = sorted(set(plan) - set(layers))
        if unknown:
            raise ValueError(f"plan names layers that are not convs or linears of the model: {unknown}")
        with torch.no_grad():
            for name, bits in plan.items():
                layers[name].weight.copy_(asymmetric_minmax(layers[name].weight, _checks.bits(f"plan[{name!r}]", bits)))
        return model
