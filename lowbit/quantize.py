"""Model surgery: ``quantize`` turns convs and linears into lowbit layers; ``swap_fused`` replaces the slow
fake-quant modules a model already has by fused ones, keeping their parameters and numerics."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit import _checks
from lowbit.nn.layers import MultiBranchQConv2d, MultiBranchQLinear, QConv2d, QLinear
from lowbit.nn.quantizers import LSQQuantizer
from lowbit.nn.reference_lsq import ReferenceLSQ
from lowbit.ops import fake_quant

FLOAT_LAYERS = (nn.Conv2d, nn.Linear)
QUANT_LAYERS = (QConv2d, QLinear)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _float_layers(model: nn.Module) -> list[str]:
    """Names of the plain convs and linears, in registration order (first and last are the stem and head)."""
    return [n for n, m in model.named_modules() if type(m) in FLOAT_LAYERS]


def quantize(
    model: nn.Module,
    w_bits: int = 4,
    a_bits: int = 4,
    *,
    multi_branch: Iterable[int] | None = None,
    skip: Iterable[str] | Callable[[str, nn.Module], bool] = (),
    first_last_bits: int | None = 8,
    bits: dict[str, int] | None = None,
) -> nn.Module:
    """Replaces every ``nn.Conv2d`` / ``nn.Linear`` of ``model`` by its lowbit counterpart, in place.

    Args:
        w_bits, a_bits: weight and activation bit-widths of the quantized layers.
        multi_branch: candidate activation bits (e.g. ``(2, 4, 8)``): layers get a MultiBranchQuantizer instead
            of a fixed ``a_bits`` (MetaMix's search space). The first and last layer stay single-branch.
        skip: layer names (or a predicate ``(name, module) -> bool``) to leave in floating point.
        first_last_bits: bits of the first and last layer (weights and activations); ``None`` treats them like
            the others. "First" and "last" follow registration order, which is the stem and the head of
            every packaged model.
        bits: per-layer weight bits overriding ``w_bits`` (a MixQuant plan: ``{layer_name: bits}``).

    Activation signedness is chosen per layer on the first batch: unsigned when the layer's input has no
    negative value (after a ReLU), signed otherwise. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    w_bits, a_bits = _checks.bits("w_bits", w_bits), _checks.bits("a_bits", a_bits)
    branches = None if multi_branch is None else _checks.bit_list("multi_branch", multi_branch)
    if first_last_bits is not None:
        first_last_bits = _checks.bits("first_last_bits", first_last_bits)
    plan = dict(bits or {})
    names = _float_layers(model)
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise ValueError(f"bits names layers that are not convs or linears of the model: {unknown}")
    for name, b in plan.items():
        _checks.bits(f"bits[{name!r}]", b)
    skipped = skip if callable(skip) else (lambda n, m, _names=frozenset(skip): n in _names)
    edges = {names[0], names[-1]} if names and first_last_bits is not None else set()
    for name in names:
        layer = model.get_submodule(name)
        if skipped(name, layer):
            continue
        edge = name in edges
        wb = plan.get(name, first_last_bits if edge else w_bits)
        _set_submodule(
            model, name, _quantized(layer, wb, first_last_bits if edge else a_bits, None if edge else branches)
        )
    return model


def _quantized(layer: nn.Module, w_bits: int, a_bits: int, branches: list[int] | None) -> nn.Module:
    conv = isinstance(layer, nn.Conv2d)
    if branches is None:
        return (QConv2d if conv else QLinear).from_float(layer, w_bits=w_bits, a_bits=a_bits)
    return (MultiBranchQConv2d if conv else MultiBranchQLinear).from_float(
        layer, w_bits=w_bits, a_bits_choices=branches
    )


# ---------------------------------------------------------------------------------------------------------------
# swap_fused
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SwapReport:
    swapped: list[tuple[str, str, str]] = field(default_factory=list)  # (name, old type, new type)
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, why it was not swapped)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} module(s) for fused lowbit ones"]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.swapped]
        if self.kept:
            lines.append(f"kept {len(self.kept)} module(s):")
            lines += [f"  {name}: {kind} ({why})" for name, kind, why in self.kept]
        return "\n".join(lines)


def _bits_for_range(qmin: int, qmax: int) -> tuple[int, bool] | None:
    """(bits, signed) whose SPEC range is exactly [qmin, qmax], or None."""
    for b in range(2, 9):
        if (qmin, qmax) == (0, 2**b - 1):
            return b, False
        if (qmin, qmax) == (-(2 ** (b - 1)), 2 ** (b - 1) - 1):
            return b, True
    return None


class FusedFakeQuantize(nn.Module):
    """A torch.ao ``FakeQuantize`` / ``_LearnableFakeQuantize`` running on ``lowbit.fake_quant``.

    It keeps the original module's observer, scale and zero point (learnable ones stay parameters) and its
    enable flags. The affine zero point becomes the LSQ+ offset ``-zero_point * scale``: the forward values are
    torch's (up to the rounding of ``x * (1/scale)`` against ``x / scale`` at exact ties); gradients follow LSQ
    (SPEC section 1), which differ from torch's learnable op where ``v`` is within half a step outside the range.
    """

    def __init__(self, original: nn.Module, bits: int, signed: bool):
        super().__init__()
        self.original = original
        self.bits, self.signed = bits, signed
        qscheme = original.activation_post_process.qscheme
        per_channel = qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        self.axis = original.ch_axis if per_channel else None
        self.learnable = hasattr(original, "learning_enabled")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fq = self.original
        if not self.learnable and fq.observer_enabled[0] == 1:
            fq.activation_post_process(x.detach())
            scale, zero_point = fq.calculate_qparams()
            fq.scale.resize_(scale.shape).copy_(scale)
            fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
        elif self.learnable and fq.static_enabled[0] == 1:
            fq.activation_post_process(x.detach())
            scale, zero_point = fq.activation_post_process.calculate_qparams()
            with torch.no_grad():
                fq.scale.data.copy_(scale.to(fq.scale.device).float())
                fq.zero_point.data.copy_(zero_point.to(fq.zero_point.device).float())
        if fq.fake_quant_enabled[0] != 1:
            return x
        scale = fq.scale.abs().clamp_min(getattr(fq, "eps", torch.tensor(1e-12)).item()) if self.learnable else fq.scale
        offset = -fq.zero_point.float().round() * scale
        grad_factor = getattr(fq, "grad_factor", None) if self.learnable else None
        return fake_quant(
            x, scale.float(), self.bits, signed=self.signed, offset=offset, axis=self.axis, grad_scale=grad_factor
        )


def _ao_fake_quant_types() -> tuple[type, ...]:
    from torch.ao.quantization import FakeQuantize
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

    return FakeQuantize, _LearnableFakeQuantize


def _replacement(module: nn.Module) -> tuple[nn.Module | None, str]:
    if isinstance(module, ReferenceLSQ):
        fused = LSQQuantizer(
            module.bits,
            signed=module.signed,
            channels=None if module.axis is None else module.step.numel(),
            axis=module.axis or 0,
        )
        with torch.no_grad():
            fused.step.copy_(module.step)
        fused.initialized = True
        return fused.to(module.step.device), ""
    if isinstance(module, _ao_fake_quant_types()):
        mapped = _bits_for_range(module.quant_min, module.quant_max)
        if mapped is None:
            return None, f"range [{module.quant_min}, {module.quant_max}] is no 2..8-bit signed/unsigned range"
        return FusedFakeQuantize(module, *mapped), ""
    return None, ""


def swap_fused(model: nn.Module) -> SwapReport:
    """Replaces, in place, the slow fake-quant modules of ``model`` by fused lowbit ones and reports them.

    Recognised: ``lowbit.nn.ReferenceLSQ`` (and LSQ modules of that round-pass/grad-scale form converted to it),
    ``torch.ao.quantization.FakeQuantize`` and ``_LearnableFakeQuantize``, per-tensor and per-channel.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = SwapReport()
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, FusedFakeQuantize):
            continue
        fused, why = _replacement(module)
        if fused is not None:
            _set_submodule(model, name, fused)
            report.swapped.append((name, type(module).__name__, type(fused).__name__))
        elif why:
            report.kept.append((name, type(module).__name__, why))
    return report
