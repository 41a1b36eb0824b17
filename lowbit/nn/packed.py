"""Packed inference layers: what ``lowbit.convert`` puts in place of a trained ``QLinear`` / ``QConv2d``.

Every layer here stores its weight as signed integer codes packed in the canonical layout of SPEC section 4
(``lowbit.pack``): one row per output channel, ``K`` = ``in_features`` (linear) or ``in_channels / groups * kh * kw``
(conv, in ``F.unfold`` order) packed along the row, plus one step per output channel (``w_step``) and the bias.
A saved model therefore holds ``bits / 32`` of the float weight bytes, whatever the layer runs on.

* ``PackedLinear``: ``lowbit.packed_linear`` (activations quantized on the fly, exact int32 accumulation).
* ``PackedConv2d``: the same GEMM over channels-last pixels (the integer data path of issue 17). 1x1 convs run
  on the pixels directly (a stride subsamples first); kxk, strided or dilated convs quantize their input to
  codes first and gather the patches of the codes (im2col on bytes, K in (kh, kw, C) order); depthwise convs
  (as many groups as input and output channels) run an integer depthwise kernel on the codes; other grouped
  convs run one GEMM per group on ``F.unfold`` patches.
* The epilogue of ``PackedLinear`` / ``PackedConv2d`` is ``clamp(float32(acc) * scale + bias, lo, hi)``, by
  default ``scale = a_step * w_step`` and the layer's bias (``packed_linear``'s epilogue). ``lowbit.convert``
  folds a following batch-norm and ReLU/ReLU6 into it (``fold``) and, when the layer's only consumer is another
  packed layer, that layer's activation quantizer too: the layer then returns uint8/int8 codes (a channels-last
  (B, C, H, W) view) that the next layer takes as they are. These run-time forms are never saved.
* ``DequantLinear`` / ``DequantConv2d``: layers whose input is not quantized (``a_bits=None``) cannot use the
  integer GEMM; they keep the packed weight and unpack it once, at load, into a float weight for ``F.linear`` /
  ``F.conv2d``.

The layers compute in float32 or in the input's float dtype and return the input's dtype; keep them in float32
(``model.half()`` would round the steps). They are inference-only: no parameters, no gradient to the codes.

Names are the training layers' (``QConv2d`` / ``QLinear``, ``lowbit.quantize``): ``w_bits``, ``w_step`` (per output
channel), ``a_bits``, ``a_step`` (per tensor), ``a_signed``. The names before format version 2 (``x_bits``,
``x_signed``, ``w_scale``, ``x_step``; see ``RENAMED``) still work as constructor / ``set_weight`` keywords and as
attributes, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.core import checks
from lowbit.core.packing import CODE_DTYPES, gemm_panel, pack_codes, packed_width, unpack_codes
from lowbit.core.ranges import quant_range

Tensor = torch.Tensor


@dataclass
class Fold:
    """What ``lowbit.convert`` folds into a packed layer's epilogue (run-time only, rebuilt at convert / load).

    bn: the eval-mode ``BatchNorm2d`` that follows the layer (its affine map joins scale and bias), or None;
    lo, hi: the clamp of the folded activation (ReLU: 0, inf; ReLU6: 0, 6; none: -inf, inf);
    consumer: the packed layer that alone reads this layer's output; its activation quantizer is applied in
        the epilogue and the layer returns codes at its step.
    """

    bn: nn.Module | None = None
    lo: float = -math.inf
    hi: float = math.inf
    consumer: nn.Module | None = None


@torch.no_grad()
def batch_norm_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """(mul, add) float32 with ``bn(y) == y * mul + add`` in eval mode, up to float32 rounding."""
    mul = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        mul = bn.weight.float() * mul
    add = -bn.running_mean.float() * mul
    if bn.bias is not None:
        add = add + bn.bias.float()
    return mul, add


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A ``BatchNorm2d`` folded into the packed layer before it: same parameters and state-dict entries (the
    saved file does not change), identity forward. Loading new statistics refreshes the layer it is folded into."""

    _folded_into: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        return x

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if self._folded_into is not None:
            self._folded_into.refresh_epilogue()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", folded into the packed layer before it"


class FoldedActivation(nn.Module):
    """A ReLU / ReLU6 folded into the packed layer before it (its clamp is in that layer's epilogue)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        return x

    def extra_repr(self) -> str:
        return f"{self.kind}, folded into the packed layer before it"


RENAMED = {"x_bits": "a_bits", "x_signed": "a_signed", "w_scale": "w_step", "x_step": "a_step"}
"""Names of format version 1 (and lowbit before it) -> the current names: constructor and ``set_weight``
keywords, attributes, config keys (``x_bits``, ``x_signed``) and state-dict entries (``w_scale``, ``x_step``)."""


def _renamed_keywords(where: str, given: dict, values: dict, defaults: dict, stacklevel: int = 3) -> dict:
    """``values`` with the deprecated keywords in ``given`` moved to their new names (DeprecationWarning);
    TypeError for any other keyword, or for an old name passed together with its new one."""
    for old, value in given.items():
        new = RENAMED.get(old)
        if new not in values:
            raise TypeError(f"{where}() got an unexpected keyword argument {old!r}")
        if values[new] is not defaults[new]:
            raise TypeError(f"{where}() got both {new!r} and its deprecated name {old!r}: pass {new} only")
        warnings.warn(f"{where}: {old}= is deprecated, use {new}=", DeprecationWarning, stacklevel=stacklevel)
        values = {**values, new: value}
    return values


def _deprecated_alias(old: str, new: str) -> property:
    def get(self):
        warnings.warn(f"{type(self).__name__}.{old} is deprecated, use .{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    def set_(self, value):
        warnings.warn(f"{type(self).__name__}.{old} is deprecated, use .{new}", DeprecationWarning, stacklevel=2)
        setattr(self, new, value)

    return property(get, set_, doc=f"Deprecated name of ``{new}`` (before format version 2).")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _int_tuple(name: str, value, length: int, minimum: int) -> tuple[int, ...]:
    """An int (repeated) or a sequence of ``length`` ints, each >= ``minimum``."""
    values = (value,) * length if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (tuple, list)) or len(values) != length:
        raise TypeError(f"{name} must be an int or {length} ints, got {value!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name} must hold ints >= {minimum}, got {value!r}")
    return tuple(values)


def _padding4(value) -> tuple[int, int, int, int]:
    """(left, right, top, bottom), the order of ``F.pad``, from an int, (pad_h, pad_w) or a 4-tuple."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        ph, pw = _int_tuple("padding", value, 2, 0)
        return (pw, pw, ph, ph)
    if isinstance(value, (tuple, list)) and len(value) == 4:
        return _int_tuple("padding", value, 4, 0)
    return _int_tuple("padding", value, 4, 0)


def _check_code_range(name: str, codes: Tensor, bits: int) -> None:
    """Signed ``bits``-bit codes only (a 3-bit layer's 4-bit container cannot hold -8)."""
    lo, hi = quant_range(bits, True)
    if codes.numel() and not bool(((codes >= lo) & (codes <= hi)).all()):
        raise ValueError(f"{name} holds codes outside the signed {bits}-bit range [{lo}, {hi}]")


_ACT_DEFAULTS = {"a_bits": None, "a_signed": False}


class PackedBase(nn.Module):
    """Weight storage shared by the packed layers: packed codes, per-channel steps, bias, activation config.

    ``quantized_input`` (a class attribute) says which kind a layer is: ``True`` for ``PackedLinear`` /
    ``PackedConv2d`` (input quantized at ``a_bits``, step ``a_step``), ``False`` for the ``Dequant*`` layers,
    whose input stays float (``a_bits`` None) and which keep a non-persistent ``dequant_weight`` buffer, rebuilt
    whenever the codes are loaded, so it follows ``.to(device)`` and never reaches a saved file.

    The constructors are the entry point where ``w_bits`` / ``a_bits`` / ``a_signed`` are checked; everything
    below them (packing, the epilogue, the GEMM) receives the checked values.
    """

    quantized_input = True

    x_bits = _deprecated_alias("x_bits", "a_bits")
    x_signed = _deprecated_alias("x_signed", "a_signed")
    w_scale = _deprecated_alias("w_scale", "w_step")
    x_step = _deprecated_alias("x_step", "a_step")

    def _init_storage(self, *, out_channels: int, k: int, w_bits, a_bits, a_signed, bias, renamed, device) -> None:
        """Checks the quantization arguments (``renamed``: deprecated keywords) and creates the buffers."""
        self.w_bits = checks.bits("w_bits", w_bits)
        self.k = k
        act = _renamed_keywords(type(self).__name__, renamed, {"a_bits": a_bits, "a_signed": a_signed}, _ACT_DEFAULTS,
                                stacklevel=4)  # fmt: skip
        self._init_activation(**act)
        bias = checks.flag("bias", bias)
        width = packed_width(k, self.w_bits)
        self.register_buffer("packed_weight", torch.zeros(out_channels, width, dtype=torch.uint8, device=device))
        self.register_buffer("w_step", torch.ones(out_channels, device=device))
        if self.quantized_input:
            self.register_buffer("a_step", torch.ones(1, device=device))
        self.register_buffer("bias", torch.zeros(out_channels, device=device) if bias else None)
        self.register_buffer("dequant_weight", None, persistent=False)
        self.register_buffer("gemm_weight", None, persistent=False)
        self.register_buffer("gemm_panel", None, persistent=False)
        self.register_buffer("epi_scale", None, persistent=False)
        self.register_buffer("epi_bias", None, persistent=False)
        self._fold: Fold | None = None
        self._refresh()

    def _init_activation(self, a_bits, a_signed) -> None:
        name = type(self).__name__
        if not self.quantized_input:
            if a_bits is not None or a_signed is not False:
                raise ValueError(
                    f"a_bits / a_signed must be left out for a {name} (its input stays float; a quantized input "
                    f"is a {name.replace('Dequant', 'Packed')}), got a_bits={a_bits!r}, a_signed={a_signed!r}"
                )
            self.a_bits, self.a_signed = None, False
            return
        if a_bits is None:
            twin = name.replace("Packed", "Dequant")
            raise ValueError(f"a_bits must be an int in 2..8 (use {twin} for a float input), got None")
        self.a_bits = checks.bits("a_bits", a_bits)
        self.a_signed = checks.flag("a_signed", a_signed)

    # -- weights ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_weight(self, codes: Tensor, w_step: Tensor | None = None, bias: Tensor | None = None,
                   a_step: Tensor | None = None, **renamed):  # fmt: skip
        """Stores int8 codes (N, K) (packed here), the weight steps (N,), the bias and the activation step."""
        defaults = {"w_step": None, "a_step": None}
        values = {"w_step": w_step, "a_step": a_step}  # stacklevel 4: the caller, past torch.no_grad's wrapper
        values = _renamed_keywords(f"{type(self).__name__}.set_weight", renamed, values, defaults, stacklevel=4)
        if values["w_step"] is None:
            raise TypeError(f"{type(self).__name__}.set_weight() missing the argument w_step")
        codes = codes.to(torch.int8).reshape(self.packed_weight.shape[0], self.k)
        _check_code_range("codes", codes, self.w_bits)
        self.packed_weight.copy_(pack_codes(codes, self.w_bits))
        self.w_step.copy_(values["w_step"].reshape(-1))
        if self.bias is not None and bias is not None:
            self.bias.copy_(bias.reshape(-1))
        if values["a_step"] is not None:
            self.a_step.copy_(values["a_step"].reshape(1))
        self._refresh()
        return self

    def weight_codes(self) -> Tensor:
        """The signed int8 codes (N, K)."""
        return unpack_codes(self.packed_weight, self.w_bits, self.k, signed=True)

    def dequantized_weight(self) -> Tensor:
        """float32 (N, K) ``codes * w_step``: bit-identical to ``lowbit.fake_quant`` of the original weight."""
        return self.weight_codes().float() * self.w_step.float().reshape(-1, 1)

    def _refresh(self) -> None:
        """Rebuilds the run-time weight forms (never saved) from the stored codes."""
        if not self.quantized_input:
            self.dequant_weight = self.dequantized_weight().reshape(self.float_weight_shape())
        self.refresh_epilogue()

    # -- the folded epilogue (run-time only) --------------------------------------------------------------------

    def fold(self, fold: Fold | None) -> None:
        """Folds batch-norm / activation / the next layer's quantizer into this layer's epilogue (None: unfold)."""
        if fold is not None and not self.quantized_input:
            raise ValueError("only layers with a quantized input (PackedConv2d / PackedLinear) take a fold")
        self._fold = fold
        self.refresh_epilogue()

    @property
    def folded(self) -> Fold | None:
        return self._fold

    @torch.no_grad()
    def refresh_epilogue(self) -> None:
        """Recomputes ``epi_scale`` / ``epi_bias`` and the clamp / output-code constants from the stored values
        and the fold (called after loads of this layer, its batch-norm or its consumer)."""
        if not self.quantized_input:
            return
        scale = (self.a_step.float() * self.w_step.float()).reshape(
            -1
        )  # packed_linear's float32 x_step * w_scale epilogue
        bias = None if self.bias is None else self.bias.float()
        fold = self._fold or Fold()
        if fold.bn is not None:
            mul, add = batch_norm_affine(fold.bn)
            scale = scale * mul
            bias = add if bias is None else bias * mul + add
        out = (0.0, 0, 0)
        if fold.consumer is not None:
            consumer = fold.consumer
            out = (float(consumer.a_step), *quant_range(consumer.a_bits, consumer.a_signed))
        self.epi_scale = scale.contiguous()
        self.epi_bias = None if bias is None else bias.contiguous()
        self._epi = (float(fold.lo), float(fold.hi), *out)
        self._quant = (float(self.a_step), *quant_range(self.a_bits, self.a_signed))

    @property
    def emits_codes(self) -> bool:
        return self._fold is not None and self._fold.consumer is not None

    def _gemm(self, rows: Tensor, weight: Tensor, channels: slice | None = None) -> Tensor:
        """The integer GEMM with this layer's epilogue: rows (M, K) float or codes -> (M, N); ``channels``: the
        output channels ``weight`` holds (one group of a grouped conv), all by default."""
        step, qmin, qmax = self._quant
        scale, bias = self.epi_scale, self.epi_bias
        if channels is not None:
            scale, bias = scale[channels], None if bias is None else bias[channels]
        panel = self.gemm_panel if channels is None else None
        return torch.ops.lowbit.packed_gemm(
            rows, weight, scale, bias, self.w_bits, step, qmin, qmax, *self._epi, panel=panel
        )  # fmt: skip

    def _check_codes(self, x: Tensor) -> None:
        """Codes must be what a fused previous layer emits for this layer: its signedness."""
        want = torch.int8 if self.a_signed else torch.uint8
        if x.dtype != want:
            raise TypeError(f"x holds {x.dtype} codes, this layer takes {want} codes (or a float tensor)")

    def float_weight_shape(self) -> tuple[int, ...]:
        """The shape of the float weight this layer holds as codes (lowbit.tools.bops.weight_bytes prices it)."""
        return (self.packed_weight.shape[0], self.k)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()  # the float weight follows the loaded codes
        if self._producer is not None:  # a fused producer quantizes to this layer's (new) step
            self._producer.refresh_epilogue()

    _producer: PackedBase | None = None

    def validate(self, name: str = "layer") -> None:
        """Raises ValueError if the stored values cannot come from a quantized layer: codes outside the
        ``w_bits`` range (e.g. a 3-bit layer's 4-bit container holding -8), steps not positive and finite."""
        _check_code_range(f"{name}: packed_weight", self.weight_codes(), self.w_bits)
        checks.step_values(f"{name}.w_step", self.w_step)
        if self.quantized_input:
            checks.step_values(f"{name}.a_step", self.a_step)
        if self.bias is not None:
            checks.finite_values(f"{name}.bias", self.bias)

    # -- config (what lowbit.save records to rebuild the layer) -----------------------------------------------

    def config(self) -> dict:
        """JSON-able constructor arguments plus ``type``: ``from_config(config())`` rebuilds the empty layer."""
        act = {"a_bits": self.a_bits, "a_signed": self.a_signed} if self.quantized_input else {}
        return {"type": type(self).__name__, **self._geometry_config(), "w_bits": self.w_bits, **act,
                "bias": self.bias is not None}  # fmt: skip

    def _geometry_config(self) -> dict:
        raise NotImplementedError

    def _act_repr(self) -> str:
        if not self.quantized_input:
            return "a=float"
        return f"a{self.a_bits} {'signed' if self.a_signed else 'unsigned'}"


# ---------------------------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------------------------


class _LinearBase(PackedBase):
    """The linear geometry and the constructor of ``PackedLinear`` / ``DequantLinear``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        w_bits: int,
        a_bits: int | None = None,
        a_signed: bool = False,
        bias: bool = True,
        device=None,
        **renamed,
    ):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        quant = {"w_bits": w_bits, "a_bits": a_bits, "a_signed": a_signed, "bias": bias, "renamed": renamed}
        self._init_storage(out_channels=out_features, k=in_features, device=device, **quant)

    def _geometry_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def _check_input(self, x: Tensor) -> None:
        checks.float_tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w{self.w_bits} {self._act_repr()}"


class PackedLinear(_LinearBase):
    """``QLinear`` for inference: ``lowbit.packed_linear``'s GEMM on packed ``w_bits`` codes, input quantized on
    the fly at ``a_bits`` (per tensor, step ``a_step``; signed range if ``a_signed``). Matches the fake-quant layer
    to float32 rounding (SPEC section 4); build it with ``lowbit.convert`` or fill it with ``set_weight``.

    ``PackedLinear(in_features, out_features, *, w_bits, a_bits, a_signed=False, bias=True, device=None)``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in CODE_DTYPES:
            self._check_codes(x)
            if x.dim() == 0 or x.shape[-1] != self.in_features:
                raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        else:
            self._check_input(x)  # names x (the GEMM would blame packed_w for a wrong K)
        y = self._gemm(x.reshape(-1, self.in_features), self.packed_weight)
        return y.view(*x.shape[:-1], self.out_features)


class DequantLinear(_LinearBase):
    """A linear layer with a float input (``a_bits=None``) and packed weights, dequantized once at load:
    ``F.linear(x, codes * w_step, bias)``, the fake-quant layer's computation.

    ``DequantLinear(in_features, out_features, *, w_bits, bias=True, device=None)``.
    """

    quantized_input = False

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequant_weight.to(x.dtype), bias)


# ---------------------------------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------------------------------


class _ConvBase(PackedBase):
    """Conv geometry (``nn.Conv2d``'s, with ``padding`` stored as (left, right, top, bottom)), the constructor of
    ``PackedConv2d`` / ``DequantConv2d`` and the shared padding / output-size logic."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        w_bits: int,
        a_bits: int | None = None,
        a_signed: bool = False,
        bias: bool = True,
        device=None,
        **renamed,
    ):
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        self.kernel_size = _int_tuple("kernel_size", kernel_size, 2, 1)
        self.stride = _int_tuple("stride", stride, 2, 1)
        self.padding = _padding4(padding)
        self.dilation = _int_tuple("dilation", dilation, 2, 1)
        self.groups = _positive_int("groups", groups)
        self.padding_mode = padding_mode
        self._check_geometry()
        k = in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]
        quant = {"w_bits": w_bits, "a_bits": a_bits, "a_signed": a_signed, "bias": bias, "renamed": renamed}
        self._init_storage(out_channels=out_channels, k=k, device=device, **quant)

    def _check_geometry(self) -> None:
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"groups must divide in_channels ({self.in_channels}) and out_channels ({self.out_channels}), "
                f"got {self.groups}"
            )
        if self.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {self.padding_mode!r}"
            )

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.in_channels == self.groups

    def float_weight_shape(self) -> tuple[int, ...]:
        """The shape of the float weight this layer holds as codes (lowbit.tools.bops.weight_bytes prices it)."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _geometry_config(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "padding_mode": self.padding_mode,
        }

    def _batched(self, x: Tensor) -> tuple[Tensor, bool]:
        """x as (B, C, H, W) (a 3-d input is one unbatched image, as for ``nn.Conv2d``)."""
        checks.float_tensor("x", x)
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W) or ({self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return (x.unsqueeze(0), True) if x.dim() == 3 else (x, False)

    def _padded(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(x, (pad_h, pad_w) still to apply as symmetric zero padding). Padding commutes with the (elementwise)
        activation quantizer, and a zero pads to code 0, so padding the float input is exact."""
        left, right, top, bottom = self.padding
        if self.padding_mode == "zeros" and left == right and top == bottom:
            return x, (top, left)
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self.padding, mode=mode), (0, 0)

    def _out_size(self, x: Tensor, pad: tuple[int, int]) -> tuple[int, int]:
        sizes = []
        for i in range(2):
            span = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            size = (x.shape[2 + i] + 2 * pad[i] - span) // self.stride[i] + 1
            if size < 1:
                raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is smaller than the kernel span")
            sizes.append(size)
        return sizes[0], sizes[1]

    def _float_conv(self, x: Tensor, pad: tuple[int, int]) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w = self.dequant_weight.to(x.dtype)
        return F.conv2d(x, w, bias, self.stride, pad, self.dilation, self.groups)

    def extra_repr(self) -> str:
        geometry = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self.groups > 1:
            geometry += f", groups={self.groups}"
        if self.dilation != (1, 1):
            geometry += f", dilation={self.dilation}"
        return f"{self.in_channels}, {self.out_channels}, {geometry}, w{self.w_bits} {self._act_repr()}"


class PackedConv2d(_ConvBase):
    """``QConv2d`` for inference on packed weights (see the module docstring for the paths).

    Integer GEMM (groups 1), integer depthwise kernel (groups == in == out channels) or one GEMM per group; all
    agree with the fake-quant conv to float32 rounding (SPEC section 4) until ``lowbit.convert`` folds batch-norm
    and activations into them (see ``fold``). ``padding`` is an int, (pad_h, pad_w) or (left, right, top, bottom).
    The input is float (B, C, H, W) or the codes a fused previous layer emits.

    ``PackedConv2d(in_channels, out_channels, kernel_size, *, stride=1, padding=0, dilation=1, groups=1,
    padding_mode="zeros", w_bits, a_bits, a_signed=False, bias=True, device=None)``.
    """

    @property
    def _channels_last_patches(self) -> bool:
        """kxk convs with groups 1 gather their patches from channels-last codes: K in (kh, kw, C) order."""
        return self.groups == 1 and self.kernel_size != (1, 1)

    @property
    def depthwise_kernel(self) -> bool:
        """Runs the integer depthwise kernel: one input and one output channel per group."""
        return self.depthwise and self.out_channels == self.in_channels

    def _refresh(self) -> None:
        gemm_codes = None
        if self._channels_last_patches:  # the codes repacked once in (kh, kw, C) order, as the patches come
            codes = self.weight_codes().view(self.out_channels, self.in_channels, *self.kernel_size)
            gemm_codes = codes.permute(0, 2, 3, 1).reshape(self.out_channels, -1)
            self.gemm_weight = pack_codes(gemm_codes, self.w_bits)
        elif self.groups == 1:
            gemm_codes = self.weight_codes()
        # the CPU panel kernel's prepacked weights (csrc/cpu/packed_panel.h)
        self.gemm_panel = None if gemm_codes is None else gemm_panel(gemm_codes)
        if self.depthwise_kernel:  # (kh * kw, C) int8: one vector of channels per tap
            self.gemm_weight = self.weight_codes().t().contiguous()
        super()._refresh()

    @property
    def path(self) -> str:
        """How forward runs: ``gemm`` (groups 1), ``depthwise`` or ``grouped-gemm``."""
        if self.groups == 1:
            return "gemm"
        return "depthwise" if self.depthwise_kernel else "grouped-gemm"

    @property
    def takes_codes(self) -> bool:
        """Whether a previous layer may hand this layer codes: integer paths with symmetric zero padding."""
        left, right, top, bottom = self.padding
        symmetric = left == right and top == bottom
        return self.path != "grouped-gemm" and self.padding_mode == "zeros" and symmetric

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype in CODE_DTYPES:
            self._check_codes(x)
            if not self.takes_codes:
                raise ValueError(f"this {self.path} conv (padding_mode={self.padding_mode!r}) takes float input")
        x, unbatched = self._batched(x)
        x, pad = self._padded(x)
        if self.path == "grouped-gemm":
            y = self._im2col(x, pad)
        elif self.path == "depthwise":
            y = self._depthwise(x, pad)
        elif self.kernel_size == (1, 1):
            y = self._pointwise(x, pad)
        else:
            y = self._patches_gemm(x, pad)
        if y.is_floating_point() and x.is_floating_point():
            y = y.to(x.dtype)
        return y.squeeze(0) if unbatched else y

    def _batched(self, x: Tensor) -> tuple[Tensor, bool]:
        if x.dtype in CODE_DTYPES:
            if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
                raise ValueError(f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
            return (x.unsqueeze(0), True) if x.dim() == 3 else (x, False)
        return super()._batched(x)

    def _codes(self, x: Tensor) -> Tensor:
        """x as channels-last (B, H, W, C) codes: the codes it holds, or the float input quantized once."""
        pixels = x.permute(0, 2, 3, 1).contiguous()
        if x.dtype in CODE_DTYPES:
            return pixels
        return torch.ops.lowbit.quantize_codes(pixels, *self._quant)

    def _pointwise(self, x: Tensor, pad: tuple[int, int]) -> Tensor:
        """1x1 conv: pad, subsample by the stride, one GEMM over channels-last pixels (float input is quantized
        inside the GEMM); the result is a channels-last (B, N, H, W) view, no copy."""
        if pad != (0, 0):
            x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        batch, _, height, width = x.shape
        y = self._gemm(x.permute(0, 2, 3, 1).reshape(-1, self.in_channels), self.packed_weight)
        return y.view(batch, height, width, self.out_channels).permute(0, 3, 1, 2)

    def _patches_gemm(self, x: Tensor, pad: tuple[int, int]) -> Tensor:
        """kxk conv, groups 1: the GEMM of the patches of channels-last codes (K in (kh, kw, C) order, code 0 for
        the padding, as padding commutes with the elementwise quantizer), gathered a block of rows at a time by the
        C++ kernel; the output is a channels-last (B, N, Ho, Wo) view."""
        out_h, out_w = self._out_size(x, pad)
        geometry = (list(self.kernel_size), list(self.stride), list(pad), list(self.dilation))
        y = torch.ops.lowbit.packed_patches_gemm(
            self._codes(x), self.gemm_weight, self.epi_scale, self.epi_bias, self.w_bits, *geometry, *self._epi,
            panel=self.gemm_panel,
        )  # fmt: skip
        return y.view(x.shape[0], out_h, out_w, self.out_channels).permute(0, 3, 1, 2)

    def _depthwise(self, x: Tensor, pad: tuple[int, int]) -> Tensor:
        """Integer depthwise conv on channels-last codes, same epilogue; a channels-last (B, C, Ho, Wo) view."""
        self._out_size(x, pad)  # names a too-small input
        y = torch.ops.lowbit.packed_depthwise(
            self._codes(x), self.gemm_weight, self.epi_scale, self.epi_bias, list(self.kernel_size),
            list(self.stride), list(pad), list(self.dilation), *self._epi,
        )  # fmt: skip
        return y.permute(0, 3, 1, 2)

    def _im2col(self, x: Tensor, pad: tuple[int, int]) -> Tensor:
        """Grouped conv: ``F.unfold`` patches (B, L, K) times each group's codes (N / groups, K)."""
        batch = x.shape[0]
        out_h, out_w = self._out_size(x, pad)
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=pad, stride=self.stride)
        cols = cols.view(batch, self.groups, self.k, -1)
        per_group = self.out_channels // self.groups
        ys = []
        for g in range(self.groups):
            channels = slice(g * per_group, (g + 1) * per_group)
            patches = cols[:, g].transpose(1, 2).reshape(-1, self.k)
            ys.append(self._gemm(patches, self.packed_weight[channels], channels).view(batch, -1, per_group))
        y = torch.cat(ys, dim=-1)
        return y.view(batch, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)


class DequantConv2d(_ConvBase):
    """A conv with a float input (``a_bits=None``) and packed weights, dequantized once at load:
    ``F.conv2d(x, codes * w_step, bias, ...)``, the fake-quant layer's computation.

    ``DequantConv2d(in_channels, out_channels, kernel_size, *, stride=1, padding=0, dilation=1, groups=1,
    padding_mode="zeros", w_bits, bias=True, device=None)``.
    """

    quantized_input = False

    def forward(self, x: Tensor) -> Tensor:
        x, unbatched = self._batched(x)
        x, pad = self._padded(x)
        y = self._float_conv(x, pad)
        return y.squeeze(0) if unbatched else y


PACKED_LAYERS: dict[str, type[PackedBase]] = {
    cls.__name__: cls for cls in (PackedLinear, DequantLinear, PackedConv2d, DequantConv2d)
}


def from_config(config: dict) -> PackedBase:
    """An empty packed layer (zero codes) built from ``layer.config()``; raises ValueError on a bad config."""
    if not isinstance(config, dict) or config.get("type") not in PACKED_LAYERS:
        found = config.get("type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"config must name a packed layer type ({', '.join(PACKED_LAYERS)}), got {found!r}")
    kwargs = {k: v for k, v in config.items() if k != "type"}
    cls = PACKED_LAYERS[config["type"]]
    positional = ("in_features", "out_features") if issubclass(cls, _LinearBase) else ("in_channels", "out_channels")
    if issubclass(cls, _ConvBase):
        positional += ("kernel_size",)
    missing = [name for name in positional if name not in kwargs]
    if missing:
        raise ValueError(f"config of a {cls.__name__} lacks {missing}")
    args = [kwargs.pop(name) for name in positional]
    try:
        return cls(*args, **kwargs)
    except TypeError as exc:  # an unknown or missing keyword: the config does not describe this layer type
        raise ValueError(f"config does not describe a {cls.__name__}: {exc}") from exc
