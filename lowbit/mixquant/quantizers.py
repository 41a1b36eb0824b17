"""Quantizers that apply a MixQuant plan ``{layer_name: bits}`` (the weight bits of each conv/linear).

The protocol is one method, ``apply(model, plan) -> nn.Module``: quantize ``model``'s weights at the plan's bits
and return the quantized model. Layers the plan does not name stay as they are. The provided quantizers change
``model`` in place (copy it first to keep the float model) and start with ``check_plan``, which a user's own
quantizer can call too, so every quantizer rejects the same bad plans the same way. Provided:

  * ``MinMaxPTQ``: vanilla asymmetric per-channel min-max post-training quantization of the weights;
  * ``LSQFineTune``: the project's LSQ layers (``lowbit.quantize(bits=plan)``) trained with ``lowbit.tools.train.fit``;
  * ``BRECQ`` (in ``lowbit.mixquant.brecq``): block reconstruction with AdaRound-style learned rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lowbit.core import checks
from lowbit.mixquant.table import SymmetricPerChannel, quantizable_layers


@runtime_checkable
class PlanQuantizer(Protocol):
    """Anything with ``apply(model, plan) -> nn.Module``; the result must evaluate like any ``nn.Module``."""

    def apply(self, model: nn.Module, plan: Mapping[str, int]) -> nn.Module: ...


def check_plan(model: nn.Module, plan: Mapping[str, int]) -> dict[str, int]:
    """``plan`` as a plain dict after checking it names convs/linears of ``model`` with ints in 2..8.

    Raises ``TypeError``/``ValueError`` naming ``plan`` (or ``model``) before any weight is touched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Mapping):
        raise TypeError(
            f"plan must be a mapping {{layer_name: bits}} (e.g. a mixquant.Plan), got {type(plan).__name__}"
        )
    layers = quantizable_layers(model)
    unknown = sorted(str(n) for n in set(plan) - set(layers))
    if unknown:
        raise ValueError(f"plan names layers that are not convs or linears of the model: {unknown}")
    return {name: checks.bits(f"plan[{name!r}]", bits) for name, bits in plan.items()}


def apply_plan(model: nn.Module, plan: Mapping[str, int], quantizer: PlanQuantizer) -> nn.Module:
    """``quantizer.apply(model, plan)`` after checking both: one entry point for built-in and user quantizers."""
    if not isinstance(quantizer, PlanQuantizer):
        raise TypeError(f"quantizer must have an apply(model, plan) method, got {type(quantizer).__name__}")
    check_plan(model, plan)
    return quantizer.apply(model, plan)


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
    """Replaces each planned layer's weight by its asymmetric per-channel min-max quantization, in place.

    ``qe_quantizer`` (``asymmetric_minmax``) is the error a QE table should measure for this quantizer.
    """

    qe_quantizer = staticmethod(asymmetric_minmax)

    def apply(self, model: nn.Module, plan: Mapping[str, int]) -> nn.Module:
        plan = check_plan(model, plan)
        layers = quantizable_layers(model)
        with torch.no_grad():
            for name, bits in plan.items():
                layers[name].weight.copy_(asymmetric_minmax(layers[name].weight, bits))
        return model

    def __repr__(self) -> str:
        return "MinMaxPTQ()"


class LSQFineTune:
    """LSQ quantization-aware fine-tuning at the plan's weight bits.

    ``apply`` swaps the planned layers for ``QConv2d``/``QLinear`` (``lowbit.quantize(bits=plan)``; weights LSQ,
    signed, per output channel) and trains the whole model with ``lowbit.tools.train.fit`` (cross-entropy, cosine
    schedule). Layers outside the plan stay float.

    Args:
        train_loader: batches ``(x, y)`` to fine-tune on.
        epochs: passes over ``train_loader``.
        lr: initial learning rate (weights and steps).
        a_bits: ``None`` (default) keeps activations float, a weight-only quantization like the plan itself;
            an int quantizes every planned layer's input with LSQ at that width.
        weight_decay, optimizer, device, progress: passed to ``lowbit.tools.train.fit``.
        test_loader, log: optional per-epoch evaluation and JSON-lines log, as in ``fit``.
    """

    qe_quantizer = SymmetricPerChannel()  # LSQ weights are symmetric per channel: the QE of SPEC's default

    def __init__(
        self,
        train_loader: Iterable,
        *,
        epochs: int = 2,
        lr: float = 0.01,
        a_bits: int | None = None,
        weight_decay: float = 0.0,
        optimizer: str = "sgd",
        device: torch.device | str = "cpu",
        progress: bool = False,
        test_loader: Iterable | None = None,
        log=None,
    ):
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.a_bits = None if a_bits is None else checks.bits("a_bits", a_bits)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.epochs, self.lr, self.weight_decay, self.optimizer = epochs, float(lr), weight_decay, optimizer
        self.device, self.progress, self.log = device, progress, log
        self.history: list[dict[str, float]] = []

    def apply(self, model: nn.Module, plan: Mapping[str, int]) -> nn.Module:
        import lowbit
        from lowbit.tools.train import fit

        plan = check_plan(model, plan)
        others = set(quantizable_layers(model)) - set(plan)
        lowbit.quantize(model, a_bits=self.a_bits or 8, bits=plan, skip=others, first_last_bits=None)
        if self.a_bits is None:
            for name in plan:
                model.get_submodule(name).act_quant = nn.Identity()  # weight-only: the input stays float
        model.to(self.device)
        self.history = fit(
            model,
            self.train_loader,
            self.test_loader,
            self.epochs,
            lr=self.lr,
            weight_decay=self.weight_decay,
            optimizer=self.optimizer,
            device=self.device,
            progress=self.progress,
            log=self.log,
            desc="lsq-finetune",
        )
        model.eval()
        return model

    def __repr__(self) -> str:
        return f"LSQFineTune(epochs={self.epochs}, lr={self.lr}, a_bits={self.a_bits})"
