"""The cost model against what the rest of the package does: ``model_bytes`` of a fake-quant model is what its
converted (packed) model stores for the weights, at every bit-width."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.tools.bops import model_bytes


def _net() -> nn.Module:
    torch.manual_seed(0)
    # K = 27, 13 * 9 = 117 and 10: none a multiple of 4, so the row padding of every container shows
    return nn.Sequential(
        nn.Conv2d(3, 13, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(13, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 10),
    )


@pytest.mark.parametrize("w_bits", [2, 3, 4, 5, 8])
def test_model_bytes_is_what_convert_stores(w_bits):
    model = lowbit.quantize(_net(), w_bits=w_bits, a_bits=8, first_last_bits=None)
    model.train()
    model(torch.rand(4, 3, 8, 8))  # initialise the LSQ steps, as training would
    expected = model_bytes(model)
    assert expected < model_bytes(model, 32) / 3  # at most 8 bits of 32
    packed = lowbit.convert(model.eval())
    codes = [t for t in packed.state_dict().values() if isinstance(t, torch.Tensor) and t.dtype == torch.uint8]
    assert len(codes) == 3 and sum(t.numel() for t in codes) == expected
