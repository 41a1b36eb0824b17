"""``fold_activation_clips``: each ReLU / ReLU6 whose output only one lowbit activation quantizer reads becomes that
quantizer's input clip, so the eager training step runs one fused pass each way where it ran two.

MobileNet-v2 reads every ReLU6 only in the next layer's activation quantizer; a ReLU6 costs a full read and write
of the activation forward and again backward (bench/results/eager_profile_cpu.md). With the clip in the quantizer
(``lowbit.fake_quant(..., clip=)``) the values and gradients are those of hardtanh followed by the quantizer, on
every backend; the C++ kernels do both in one pass. ``unfold_activation_clips`` puts the activations back
(``lowbit.convert`` does, before it folds them into its packed epilogues).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.nn.layers import QConv2d, QLinear
from lowbit.nn.quantizers import FoldedClip, LSQQuantizer, MultiBranchQuantizer
from lowbit.tools.fx_graph import called_module, module_calls, only_user

_CLIPS = {nn.ReLU: ("ReLU", (0.0, math.inf)), nn.ReLU6: ("ReLU6", (0.0, 6.0))}
_ACTIVATION_OF = {"ReLU": nn.ReLU, "ReLU6": nn.ReLU6}
_CLIPPING_QUANTIZERS = (LSQQuantizer, MultiBranchQuantizer)  # the activation quantizers that take input_clip


class _LayerTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QConv2d, QLinear, FoldedClip)) or super().is_leaf_module(m, qualname)


def fold_activation_clips(model: nn.Module, *, strict: bool = True) -> list[tuple[str, str]]:
    """Folds every ``nn.ReLU`` / ``nn.ReLU6`` whose output is read only by a ``QConv2d`` / ``QLinear`` (an
    ``LSQQuantizer`` or, in MetaMix's multi-branch layers, a ``MultiBranchQuantizer`` on its input) into that
    layer's activation quantizer, in place: the quantizer gets ``input_clip`` (0, inf) or (0, 6) and the
    activation is replaced by ``FoldedClip`` (the identity). The model computes the same values and gradients.

    The graph comes from ``torch.fx`` with the quantized layers as leaves; an activation module called in more than
    one place, or in place on a tensor something else reads, is left alone. Idempotent. Returns (activation name,
    layer name) per fold. A model torch.fx cannot trace raises ValueError when ``strict``, else stays as it is
    (``lowbit.quantize`` folds with ``strict=False``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
    try:
        graph = _LayerTracer().trace(model)
    except Exception as exc:  # any tracing failure: nothing is folded, and strict says why
        if strict:
            raise ValueError(f"fold_activation_clips: torch.fx could not trace the model ({exc})") from exc
        return []
    calls = module_calls(graph)
    folded = []
    for node in graph.nodes:
        layer_name = _foldable(model, calls, node)
        if layer_name:
            kind, clip = _CLIPS[type(model.get_submodule(node.target))]
            quantizer = model.get_submodule(layer_name).act_quant
            quantizer.input_clip = clip
            folded_clip = FoldedClip(kind, clip)
            parent_name, _, child = layer_name.rpartition(".")
            folded_clip.attach(model.get_submodule(parent_name), child, quantizer)
            model.set_submodule(node.target, folded_clip)
            folded.append((node.target, layer_name))
    return folded


def unfold_activation_clips(model: nn.Module) -> int:
    """Undoes ``fold_activation_clips`` in place: each ``FoldedClip`` becomes its activation again and no quantizer
    clips its input. Returns how many activations were put back."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = [(name, m.kind) for name, m in model.named_modules() if isinstance(m, FoldedClip)]
    for name, kind in restored:
        model.set_submodule(name, _ACTIVATION_OF[kind]())
    for m in model.modules():
        if isinstance(m, _CLIPPING_QUANTIZERS):
            m.input_clip = None
    return len(restored)


def _foldable(model: nn.Module, calls: dict, node) -> str | None:
    """The name of the quantized layer the activation at ``node`` folds into, or None."""
    activation = called_module(model, calls, node)
    if type(activation) not in _CLIPS:
        return None
    source = node.args[0] if node.args else None
    if activation.inplace and not (isinstance(source, torch.fx.Node) and len(source.users) == 1):
        return None  # in place: the input's other readers see the clip
    user, layer = only_user(model, calls, node)
    if not isinstance(layer, (QConv2d, QLinear)) or not isinstance(layer.act_quant, _CLIPPING_QUANTIZERS):
        return None
    return user.target if layer.act_quant.input_clip is None else None
