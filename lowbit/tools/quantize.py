"""Model surgery: ``quantize`` turns convs and linears into lowbit layers. ``swap_fused`` (in ``lowbit.swap``,
re-exported here) replaces the slow fake-quant modules a model already has by fused ones."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

from lowbit.core import checks
from lowbit.nn.layers import MultiBranchQConv2d, MultiBranchQLinear, QConv2d, QLinear
from lowbit.tools.fold import fold_activation_clips
from lowbit.tools.swap import FusedFakeQuantize, FusedLSQ, SwapReport, register_fake_quant, swap_fused

__all__ = [
    "FusedFakeQuantize",
    "FusedLSQ",
    "SwapReport",
    "float_layer_names",
    "quantize",
    "register_fake_quant",
    "swap_fused",
]

FLOAT_LAYERS = (nn.Conv2d, nn.Linear)
QUANT_LAYERS = (QConv2d, QLinear)


def float_layer_names(model: nn.Module) -> list[str]:
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
    fold_clips: bool = True,
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
        fold_clips: fold each ReLU / ReLU6 read only by a quantized layer into its activation quantizer
            (``fold_activation_clips``, same values, one pass less each way in eager mode). A model torch.fx
            cannot trace is quantized unfolded.

    Activation signedness is chosen per layer on the first batch: unsigned when the layer's input has no
    negative value (after a ReLU), signed otherwise. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    w_bits, a_bits = checks.bits("w_bits", w_bits), checks.bits("a_bits", a_bits)
    branches = None if multi_branch is None else checks.bit_list("multi_branch", multi_branch)
    if first_last_bits is not None:
        first_last_bits = checks.bits("first_last_bits", first_last_bits)
    plan = dict(bits or {})
    names = float_layer_names(model)
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise ValueError(f"bits names layers that are not convs or linears of the model: {unknown}")
    for name, b in plan.items():
        checks.bits(f"bits[{name!r}]", b)
    skipped = skip if callable(skip) else (lambda n, m, _names=frozenset(skip): n in _names)
    edges = {names[0], names[-1]} if names and first_last_bits is not None else set()
    for name in names:
        layer = model.get_submodule(name)
        if skipped(name, layer):
            continue
        edge = name in edges
        wb = plan.get(name, first_last_bits if edge else w_bits)
        model.set_submodule(
            name, _quantized(layer, wb, first_last_bits if edge else a_bits, None if edge else branches)
        )
    if checks.flag("fold_clips", fold_clips):
        fold_activation_clips(model, strict=False)
    return model


def _quantized(layer: nn.Module, w_bits: int, a_bits: int, branches: list[int] | None) -> nn.Module:
    conv = isinstance(layer, nn.Conv2d)
    if branches is None:
        return (QConv2d if conv else QLinear).from_float(layer, w_bits=w_bits, a_bits=a_bits)
    return (MultiBranchQConv2d if conv else MultiBranchQLinear).from_float(
        layer, w_bits=w_bits, a_bits_choices=branches
    )
