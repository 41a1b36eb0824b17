"""``lowbit.convert``: a trained fake-quant model (``QConv2d`` / ``QLinear``) to packed inference layers.

The weight codes are the LSQ codes the fake-quant model uses, taken from ``lowbit.fake_quant`` itself (the same
float32 division and round-half-to-even; see ``lsq_weight_codes``), so the packed model computes on exactly the
weights the trained model used. Activation steps, bit-widths and signedness are copied from each layer's
``act_quant``; the packed layers use the training layers' names (``w_bits``, ``w_step``, ``a_bits``, ``a_step``,
``a_signed``). Everything that is not a lowbit quantized layer (BN, pooling, plain float layers) is left as it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.core.steps import positive_step
from lowbit.nn.layers import QConv2d, QLinear
from lowbit.nn.packed import (
    DequantConv2d,
    DequantLinear,
    Fold,
    FoldedActivation,
    FoldedBatchNorm2d,
    PackedBase,
    PackedConv2d,
    PackedLinear,
)
from lowbit.nn.quantizers import LSQQuantizer
from lowbit.ops import fake_quant
from lowbit.tools.fold import unfold_activation_clips
from lowbit.tools.fx_graph import called_module, module_calls, only_user

MULTI_BRANCH_POLICIES = ("error", "selected")

_FLOAT_WHY = (
    "float layer, not a lowbit QConv2d/QLinear (skipped by quantize, or weights rounded in place by a PTQ method "
    "such as MixQuant's asymmetric MinMaxPTQ, whose zero points the symmetric packed format cannot hold)"
)


@dataclass
class ConvertReport:
    """What ``convert`` did: ``converted`` (name, old type, new type, how it runs), ``kept`` (name, type, why) and
    ``fused`` (layer name, what was folded into it), or ``not_fused`` (why the model was left unfused)."""

    converted: list[tuple[str, str, str, str]] = field(default_factory=list)
    kept: list[tuple[str, str, str]] = field(default_factory=list)
    fused: list[tuple[str, str]] = field(default_factory=list)
    not_fused: str = ""

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layer(s) to packed layers"]
        lines += [f"  {name}: {old} -> {new} ({how})" for name, old, new, how in self.converted]
        if self.kept:
            lines.append(f"kept {len(self.kept)} float layer(s):")
            lines += [f"  {name}: {kind} ({why})" for name, kind, why in self.kept]
        if self.fused:
            lines.append(f"fused {len(self.fused)} layer epilogue(s):")
            lines += [f"  {name}: {what}" for name, what in self.fused]
        if self.not_fused:
            lines.append(f"not fused: {self.not_fused}")
        return "\n".join(lines)


def lsq_weight_codes(layer: QConv2d | QLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (N, K), float32 steps (N,)) of a layer's weight, exactly as its fake-quant forward rounds them.

    ``lowbit.fake_quant`` gives ``q * s`` (float32); ``q * s / s`` is within 2^-17 of the integer ``q`` for
    ``|q| <= 128``, so ``round`` recovers ``q`` exactly: no second rounding rule, only the op's. The result is
    checked: ``codes * s`` must reproduce the op's output bit for bit.
    """
    quantizer = layer.weight_quant
    steps = positive_step(quantizer.step.detach()).float().reshape(-1)
    weight = layer.weight.detach().float()
    fq = fake_quant(weight, steps, quantizer.bits, signed=True, axis=0 if steps.numel() > 1 else None)
    shaped = steps.reshape(-1, *([1] * (weight.dim() - 1)))
    codes = torch.round(fq / shaped)
    if not torch.equal(codes * shaped, fq):
        raise RuntimeError("lsq_weight_codes: codes * step does not reproduce fake_quant's weight; please report")
    steps = steps.expand(weight.shape[0]).contiguous()
    return codes.to(torch.int8).reshape(weight.shape[0], -1), steps


def _check_layer(name: str, layer: nn.Module) -> None:
    """Raises ValueError naming the layer when its quantizers cannot be packed."""
    wq = layer.weight_quant
    if not isinstance(wq, LSQQuantizer) or wq.signed is not True:
        raise ValueError(f"layer {name!r}: weight_quant must be a signed LSQQuantizer, got {wq!r}")
    if not wq.initialized:
        raise ValueError(
            f"layer {name!r} has uninitialised LSQ steps: run at least one calibration forward pass before convert"
        )
    aq = layer.act_quant
    if isinstance(aq, nn.Identity):
        return
    if not isinstance(aq, LSQQuantizer):
        raise ValueError(
            f"layer {name!r}: act_quant must be an LSQQuantizer (or nn.Identity for a float input), "
            f"got {type(aq).__name__}"
        )
    if not aq.initialized or aq.signed is None:
        raise ValueError(
            f"layer {name!r} has an uninitialised activation quantizer: run at least one calibration forward pass"
        )
    if aq.step.numel() != 1:
        raise ValueError(f"layer {name!r}: act_quant must be per-tensor (one step), got {aq.step.numel()} steps")


# (is a conv, has a quantized input) -> the packed layer class
_PACKED_CLASSES = {
    (True, True): PackedConv2d,
    (True, False): DequantConv2d,
    (False, True): PackedLinear,
    (False, False): DequantLinear,
}


def _packed(layer: QConv2d | QLinear) -> PackedBase:
    """The packed replacement of one quantized layer, on the layer's device. ``_check_layer`` has checked its
    quantizers, whose bits their constructors checked: the packed layer's constructor is the one check here."""
    aq = layer.act_quant
    quantized_input = isinstance(aq, LSQQuantizer)  # else nn.Identity: a float input
    quant = {"w_bits": layer.weight_quant.bits, "bias": layer.bias is not None, "device": layer.weight.device}
    if quantized_input:
        quant.update(a_bits=aq.bits, a_signed=bool(aq.signed))
    is_conv = isinstance(layer, QConv2d)
    cls = _PACKED_CLASSES[is_conv, quantized_input]
    if is_conv:
        geometry = {
            "stride": tuple(layer.stride),
            "padding": tuple(layer._reversed_padding_repeated_twice),  # (left, right, top, bottom), "same" too
            "dilation": tuple(layer.dilation),
            "groups": layer.groups,
            "padding_mode": layer.padding_mode,
        }
        packed = cls(layer.in_channels, layer.out_channels, tuple(layer.kernel_size), **geometry, **quant)
    else:
        packed = cls(layer.in_features, layer.out_features, **quant)
    codes, w_step = lsq_weight_codes(layer)
    a_step = positive_step(aq.step.detach()).float() if quantized_input else None
    bias = None if layer.bias is None else layer.bias.detach().float()
    return packed.set_weight(codes, w_step, bias, a_step)


def _how(layer: PackedBase) -> str:
    act = f"A{layer.a_bits} {'signed' if layer.a_signed else 'unsigned'}" if layer.quantized_input else "float input"
    if isinstance(layer, PackedConv2d) and layer.path == "depthwise":
        run = "integer depthwise kernel"
    elif isinstance(layer, (PackedConv2d, PackedLinear)):
        run = "integer GEMM" + (" per group" if getattr(layer, "path", "") == "grouped-gemm" else "")
    else:
        run = "float input: weights dequantized once at load"
    return f"W{layer.w_bits} {act}, {run}"


def _single_branch(name: str, layer: nn.Module, multi_branch: str) -> nn.Module:
    if not hasattr(layer, "to_single_branch"):
        return layer
    if multi_branch == "error":
        raise ValueError(
            f"layer {name!r} is multi-branch ({type(layer).__name__}, activation bits {layer.candidate_bits}): "
            "convert it to one branch first (layer.to_single_branch(bits) and retrain), or pass "
            "multi_branch='selected' to pack each such layer at its selected branch"
        )
    return layer.to_single_branch()


def _check_args(model, inplace, multi_branch, return_report) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for arg, value in (("inplace", inplace), ("return_report", return_report)):
        if not isinstance(value, bool):
            raise TypeError(f"{arg} must be a bool, got {type(value).__name__}")
    if multi_branch not in MULTI_BRANCH_POLICIES:
        raise ValueError(f"multi_branch must be one of {MULTI_BRANCH_POLICIES}, got {multi_branch!r}")


def _quantized_layers(model: nn.Module) -> list[str]:
    names = [name for name, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]
    if names:
        return names
    if any(isinstance(m, PackedBase) for m in model.modules()):
        raise ValueError("model has no QConv2d/QLinear layers left to convert: it is already converted")
    raise ValueError(
        "model has no QConv2d/QLinear layers to convert: quantize it with lowbit.quantize and train or calibrate "
        "it first (plain nn.Conv2d/nn.Linear layers, including MinMaxPTQ's, stay float and are not packed)"
    )


def convert(
    model: nn.Module,
    *,
    inplace: bool = False,
    multi_branch: str = "error",
    return_report: bool = False,
    fuse: bool = True,
):
    """Replaces every ``QConv2d`` / ``QLinear`` of ``model`` by its packed inference layer.

    Args:
        model: a model with lowbit quantized layers whose LSQ steps are initialised (trained, or one
            calibration forward pass).
        inplace: change ``model`` itself; by default a deep copy is converted and ``model`` is left as it is.
        multi_branch: ``"error"`` (default) raises ValueError naming the first ``MultiBranchQConv2d`` /
            ``MultiBranchQLinear``: its output mixes several activation widths, which no packed layer computes.
            ``"selected"`` packs each such layer at its selected branch (``to_single_branch()``): the result
            then equals that single-branch model, not the mixture.
        return_report: also return a ``ConvertReport`` (what was converted, how it runs, what stayed float).
        fuse: build the integer data path (``fuse_inference``): fold each packed layer's batch-norm and
            ReLU/ReLU6 into its epilogue and hand codes to the next packed layer. The result then equals the
            fake-quant model with the same folding applied (docs/decisions.md), not the unfolded model bit for bit.

    Layers with a quantized input become ``PackedConv2d`` / ``PackedLinear``; layers with a float input
    (``a_bits=None``) become ``DequantConv2d`` / ``DequantLinear``. All weights are stored packed. Plain
    ``nn.Conv2d`` / ``nn.Linear`` stay float and are listed in the report. Every quantized layer is checked before
    the model is touched. Returns the converted model (and the report if asked).
    """
    _check_args(model, inplace, multi_branch, return_report)
    names = _quantized_layers(model)
    for name in names:
        _check_layer(name, _single_branch(name, model.get_submodule(name), multi_branch))
    target = model if inplace else copy.deepcopy(model)
    unfold_activation_clips(target)  # the activations come back, to be folded into the packed epilogues
    report = ConvertReport()
    for name in names:
        original = target.get_submodule(name)
        with torch.no_grad():
            packed = _packed(_single_branch(name, original, multi_branch))
        if name:
            _set_submodule(target, name, packed)
        else:  # the model is one quantized layer
            target = packed
        report.converted.append((name, type(original).__name__, type(packed).__name__, _how(packed)))
    report.kept = [(n, type(m).__name__, _FLOAT_WHY) for n, m in target.named_modules() if type(m) in _FLOAT_TYPES]
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be a bool, got {type(fuse).__name__}")
    if fuse:
        report.fused, report.not_fused = _fuse(target)
    return (target, report) if return_report else target


_FLOAT_TYPES = (nn.Conv2d, nn.Linear)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


# ---------------------------------------------------------------------------------------------------------------
# fuse_inference: the integer data path between packed layers (issue 17)
# ---------------------------------------------------------------------------------------------------------------

_ACTIVATIONS = {nn.ReLU: ("ReLU", 0.0, float("inf")), nn.ReLU6: ("ReLU6", 0.0, 6.0)}
_FOLDED_BOUNDS = {"ReLU": (0.0, float("inf")), "ReLU6": (0.0, 6.0)}


def fuse_inference(model: nn.Module, *, strict: bool = True) -> list[tuple[str, str]]:
    """Builds the integer data path of a converted model, in place: every ``PackedConv2d`` / ``PackedLinear``
    followed only by an eval ``BatchNorm2d`` (and then a ReLU / ReLU6) gets them folded into its epilogue, and a
    layer whose output only one packed layer reads emits that layer's activation codes. The batch-norm stays in
    the model as ``FoldedBatchNorm2d`` (same state-dict entries), the activation becomes ``FoldedActivation``.

    The graph comes from ``torch.fx`` tracing with packed layers as leaves. Idempotent; ``lowbit.convert`` and
    ``lowbit.load`` call it. Returns (layer name, what was folded) per fused layer; a model that cannot be
    traced raises ValueError when ``strict``, else stays unfused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fused, why = _fuse(model)
    if why and strict:
        raise ValueError(f"fuse_inference: {why}")
    return fused


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (PackedBase, FoldedBatchNorm2d, FoldedActivation)) or super().is_leaf_module(m, qualname)


def _fuse(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """(fused layers, "") or ([], why the model was left unfused)."""
    if isinstance(model, PackedBase) or not any(isinstance(m, PackedBase) for m in model.modules()):
        return [], "no packed layer inside a model to fuse"
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # any tracing failure: the model runs unfused, and the report says why
        return [], f"torch.fx could not trace the model ({type(exc).__name__}: {str(exc)[:200]})"
    calls = module_calls(graph)
    fused = []
    for node in graph.nodes:
        layer = called_module(model, calls, node)
        if isinstance(layer, (PackedConv2d, PackedLinear)):
            what = _fold_chain(model, calls, node, layer)
            if what:
                fused.append((node.target, what))
    return fused, ""


def _fold_chain(model: nn.Module, calls: dict, node, layer: PackedBase) -> str:
    """Folds the BN / activation / next quantizer after ``layer`` (at ``node``) into it; returns what it folded."""
    fold, what, last = Fold(), [], node
    user, module = only_user(model, calls, last)
    if isinstance(module, nn.BatchNorm2d) and module.running_var is not None:
        if not isinstance(module, FoldedBatchNorm2d):
            module = _swap(model, user.target, _folded_batch_norm(module))
        object.__setattr__(module, "_folded_into", layer)  # a plain reference, not a submodule
        fold.bn, what, last = module, [user.target], user
        user, module = only_user(model, calls, last)
    kind = _activation_kind(module)
    if kind:
        if not isinstance(module, FoldedActivation):
            module = _swap(model, user.target, FoldedActivation(kind))
        fold.lo, fold.hi = _FOLDED_BOUNDS[kind]
        what.append(user.target)
        last = user
        user, module = only_user(model, calls, last)
    if isinstance(module, (PackedConv2d, PackedLinear)) and getattr(module, "takes_codes", True):
        fold.consumer = module
        object.__setattr__(module, "_producer", layer)  # a plain reference, not a submodule
        what.append(f"codes for {user.target}")
    if not what:
        return ""
    layer.fold(fold)
    return " + ".join(what)


def _activation_kind(module) -> str | None:
    if isinstance(module, FoldedActivation):
        return module.kind
    entry = _ACTIVATIONS.get(type(module))
    return entry[0] if entry else None


def _folded_batch_norm(bn: nn.BatchNorm2d) -> FoldedBatchNorm2d:
    folded = FoldedBatchNorm2d(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device=bn.running_mean.device
    )
    folded.load_state_dict(bn.state_dict())
    return folded.eval()


def _swap(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    _set_submodule(model, name, module)
    return module
