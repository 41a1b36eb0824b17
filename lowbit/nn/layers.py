"""Quantized conv and linear layers: thin modules over the fused ops.

``QConv2d`` / ``QLinear`` quantize their weight (LSQ, signed, per output channel) and their input (LSQ,
per-tensor). ``MultiBranchQConv2d`` / ``MultiBranchQLinear`` quantize the input with a ``MultiBranchQuantizer``
and still run ONE convolution per forward: by linearity ``conv(sum_i p_i Q_i(x), W) = sum_i p_i conv(Q_i(x), W)``
(SPEC section 2).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.nn.quantizers import LSQQuantizer, MultiBranchQuantizer


class _Quantized:
    """What every quantized layer shares: weight/activation quantizers and bit-widths. (MACs and BOPs are
    counted outside the layers, by ``lowbit.tools.bops``, so a forward pass has no side effect.)"""

    weight_quant: LSQQuantizer
    act_quant: nn.Module

    def _setup_quantizers(self, w_bits: int, act_quant: nn.Module) -> None:
        self.weight_quant = LSQQuantizer(w_bits, signed=True, channels=self.weight.shape[0], axis=0)
        self.act_quant = act_quant

    @property
    def w_bits(self) -> int:
        return self.weight_quant.bits

    @w_bits.setter
    def w_bits(self, value: int) -> None:
        self.weight_quant.bits = value

    def _copy_float(self, layer: nn.Module) -> None:
        with torch.no_grad():
            self.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.bias.copy_(layer.bias)


class QConv2d(nn.Conv2d, _Quantized):
    """``nn.Conv2d`` with LSQ weights (``w_bits``, per output channel) and LSQ inputs (``a_bits``, per tensor).

    ``a_signed=None`` picks the activation range on the first batch (unsigned if it has no negative value).
    ``a_bits=None`` leaves the input unquantized.
    """

    def __init__(self, *args, w_bits: int = 4, a_bits: int | None = 4, a_signed: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        act = LSQQuantizer(a_bits, signed=a_signed) if a_bits is not None else nn.Identity()
        self._setup_quantizers(w_bits, act)

    @property
    def a_bits(self) -> int | None:
        return getattr(self.act_quant, "bits", None)

    @a_bits.setter
    def a_bits(self, value: int) -> None:
        self.act_quant.bits = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant) -> QConv2d:
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **quant,
        )
        layer._copy_float(conv)
        return layer


class QLinear(nn.Linear, _Quantized):
    """``nn.Linear`` with LSQ weights (per output feature) and LSQ inputs (per tensor); see ``QConv2d``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_bits: int = 4,
        a_bits: int | None = 4,
        a_signed: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        act = LSQQuantizer(a_bits, signed=a_signed) if a_bits is not None else nn.Identity()
        self._setup_quantizers(w_bits, act)

    a_bits = QConv2d.a_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant) -> QLinear:
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            **quant,
        )
        layer._copy_float(linear)
        return layer


class _MultiBranch:
    """Shared by the multi-branch layers (listed first among their bases, so that this ``__init__`` runs first):
    the ``MultiBranchQuantizer`` input, expected and selected bits, conversion to one branch."""

    act_quant: MultiBranchQuantizer
    single_branch_class: type[QConv2d] | type[QLinear]

    def __init__(self, *args, w_bits: int = 4, a_bits_choices=(2, 4, 8), a_signed: bool | None = None, **kwargs):
        super().__init__(*args, w_bits=w_bits, a_bits=None, **kwargs)
        self.act_quant = MultiBranchQuantizer(a_bits_choices, signed=a_signed)

    @property
    def candidate_bits(self) -> list[int]:
        return self.act_quant.bits

    def expected_bits(self) -> torch.Tensor:
        return self.act_quant.expected_bits()

    def selected_bits(self) -> int:
        return self.act_quant.selected_bits()

    def to_single_branch(self, bits: int | None = None) -> QConv2d | QLinear:
        """A single-branch layer at ``bits`` (default: the selected branch) keeping the weights and that branch's
        step."""
        single = self.single_branch_class.from_float(self, w_bits=self.w_bits, a_bits=None)
        single.act_quant = self.act_quant.branch_quantizer(self.selected_bits() if bits is None else bits)
        single.weight_quant.load_state_dict(self.weight_quant.state_dict())
        return single


class MultiBranchQConv2d(_MultiBranch, QConv2d):
    """``QConv2d`` whose input goes through a ``MultiBranchQuantizer`` over ``a_bits_choices``; the other
    arguments are ``QConv2d``'s."""

    single_branch_class = QConv2d


class MultiBranchQLinear(_MultiBranch, QLinear):
    """``QLinear`` whose input goes through a ``MultiBranchQuantizer`` over ``a_bits_choices``; the other
    arguments are ``QLinear``'s (``in_features, out_features, bias=True, *, w_bits=4, device=None, dtype=None``)."""

    single_branch_class = QLinear
