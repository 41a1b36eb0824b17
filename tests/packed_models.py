"""Tiny packaged models at mixed per-layer bit plans, calibrated, for the conversion tests (``test_convert.py``,
``test_packed_layers_integer.py``)."""

from __future__ import annotations

import torch
from torch import nn

import lowbit
from lowbit.models import create_model
from lowbit.nn.layers import QConv2d, QLinear


def calibrated_model(
    name: str,
    kwargs: dict,
    size: int,
    w_bits: tuple[int, ...],
    a_bits: tuple[int, ...],
    *,
    seed: int = 0,
    keep_first_last: bool = False,
    float_input_layer: int | None = None,
) -> tuple[nn.Module, torch.Tensor]:
    """``create_model(name, **kwargs)`` (3 input channels, 10 classes) quantized with ``w_bits`` / ``a_bits``
    cycled over its layers (all of them, or all but the first and last, which ``quantize`` keeps at 8 bits, when
    ``keep_first_last``), steps and activation signedness initialised on one (8, 3, size, size) batch, in eval
    mode; returns (model, batch). ``float_input_layer``: the index of a layer given a float input (a ``Dequant*``
    layer after convert).

    BN running statistics are set from the same batch in float first (momentum 1), so that eval-mode activations
    have a realistic scale and the logits are not degenerate.
    """
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_channels=3, **kwargs)
    x = torch.randn(8, 3, size, size)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()(x)
    model.eval()
    lowbit.quantize(model, 4, 8)
    layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    for i, layer in enumerate(layers[1:-1] if keep_first_last else layers):
        layer.w_bits = w_bits[i % len(w_bits)]
        layer.act_quant.bits = a_bits[i % len(a_bits)]
    if float_input_layer is not None:
        layers[float_input_layer].act_quant = nn.Identity()
    with torch.no_grad():
        model(x)
    return model, x
