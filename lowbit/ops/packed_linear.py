"""Packed integer storage and the packed linear op (SPEC sections 4 and 5).

``pack`` / ``unpack`` convert between int8 codes and the canonical saved layout (codes packed along the last
dimension into uint8, low bits first). ``packed_linear`` is the inference GEMM: it quantizes the activations on the
fly (per tensor, SPEC section 1), multiplies by the packed weight codes with exact int32 accumulation and applies the
per-output-channel scale and the bias in the epilogue:

    y[m, n] = float32(acc[m, n]) * float32(x_step * w_scale[n]) + bias[n],   acc = sum_k qx[m, k] * qw[n, k]

Every backend evaluates exactly that float32 expression, so backends agree bit for bit, and the result matches
``F.linear(fake_quant(x), dequant(W)) + bias`` to float32 rounding. A row of ``x`` holding a NaN gives a NaN
output row (the fake-quant reference propagates NaN the same way); infinities clamp to the range ends.

The op is inference-only: integer codes carry no gradient (train with ``QLinear`` / ``QConv2d``, then
``lowbit.convert``).
"""

from __future__ import annotations

import math

import torch

from lowbit.backends import select
from lowbit.core import checks
from lowbit.core.packing import CODE_DTYPES, code_dtype, codes_per_byte, pack_codes, packed_width, unpack_codes
from lowbit.core.ranges import quant_range
from lowbit.ops.library import define

Tensor = torch.Tensor


def _check_codes_values(codes: Tensor, bits: int) -> None:
    signed = codes.dtype == torch.int8
    lo, hi = quant_range(bits, signed)
    if codes.numel() and not bool(((codes >= lo) & (codes <= hi)).all()):
        found = (int(codes.min()), int(codes.max()))
        kind = "signed (int8)" if signed else "unsigned (uint8)"
        raise ValueError(f"codes must lie in [{lo}, {hi}] for {bits}-bit {kind} codes, got values in {list(found)}")


define("pack(Tensor codes, int bits) -> Tensor", pack_codes, lambda codes, bits: _pack_fake(codes, bits))
define(
    "unpack(Tensor packed, int bits, int k, bool signed) -> Tensor",
    unpack_codes,
    lambda packed, bits, k, signed: packed.new_empty(
        (*packed.shape[:-1], k), dtype=torch.int8 if signed else torch.uint8
    ),
)


def _pack_fake(codes: Tensor, bits: int) -> Tensor:
    return codes.new_empty((*codes.shape[:-1], packed_width(codes.shape[-1], bits)), dtype=torch.uint8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Packs integer codes along the last dimension into the canonical uint8 layout of SPEC section 4.

    Args:
        codes: int8 tensor of signed codes (two's complement) or uint8 tensor of unsigned codes, shape (..., K),
            every value inside the ``bits`` range.
        bits: 2..8; 3 is stored in 4-bit fields and 5..7 in bytes.

    Returns a uint8 tensor (..., ceil(K / codes_per_byte)); the padding codes are zero.
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"codes must be int8 (signed codes) or uint8 (unsigned codes), got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension (the packed one, K), got a 0-d tensor")
    bits = checks.bits("bits", bits)
    _check_codes_values(codes, bits)
    return torch.ops.lowbit.pack(codes.contiguous(), bits)


def unpack(packed: Tensor, bits: int, k: int, *, signed: bool = True) -> Tensor:
    """Inverse of ``pack``: the first ``k`` codes of each row, int8 when ``signed`` (the default) else uint8."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (the output of lowbit.pack), got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension, got a 0-d tensor")
    bits = checks.bits("bits", bits)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 0 or packed_width(k, bits) != packed.shape[-1]:
        raise ValueError(
            f"k must be the unpacked row length: a packed row of {packed.shape[-1]} bytes holds "
            f"{packed.shape[-1] * codes_per_byte(bits)} or fewer {bits}-bit codes (k={k} needs "
            f"{packed_width(max(k, 0), bits)} bytes)"
        )
    signed = checks.flag("signed", signed)
    return torch.ops.lowbit.unpack(packed.contiguous(), bits, k, signed)


# ---------------------------------------------------------------------------------------------------------------
# packed_linear: quantize x on the fly, int32 GEMM against packed weights, scale + bias epilogue
# ---------------------------------------------------------------------------------------------------------------


def _packed_linear_impl(x, packed_w, w_scale, w_bits, x_step, x_bits, x_signed, bias):
    n = packed_w.shape[0]
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: K may be 0
    out_shape = (*x.shape[:-1], n)
    if x2d.shape[0] == 0 or n == 0:
        return x.new_empty(out_shape)
    kernels = select(x.device).kernels  # checks the values of x_step and w_scale
    qmin, qmax = quant_range(x_bits, x_signed)
    y = kernels.packed_linear(
        x2d.contiguous(), packed_w.contiguous(), w_scale.contiguous(), w_bits, x_step, qmin, qmax, bias
    )
    return y.reshape(out_shape)


def _packed_linear_fake(x, packed_w, w_scale, w_bits, x_step, x_bits, x_signed, bias):
    return x.new_empty((*x.shape[:-1], packed_w.shape[0]))


define(
    "packed_linear(Tensor x, Tensor packed_w, Tensor w_scale, int w_bits, Tensor x_step, int x_bits, bool x_signed, "
    "Tensor? bias) -> Tensor",
    _packed_linear_impl,
    _packed_linear_fake,
)


def _check_packed_weight(packed_w, w_scale, w_bits: int, k: int, x: Tensor) -> None:
    if not isinstance(packed_w, torch.Tensor):
        raise TypeError(f"packed_w must be a torch.Tensor, got {type(packed_w).__name__}")
    if packed_w.dtype != torch.uint8 or packed_w.dim() != 2:
        raise TypeError(
            "packed_w must be a 2-d uint8 tensor (N, packed K) from lowbit.pack, "
            f"got a {packed_w.dim()}-d {packed_w.dtype} tensor"
        )
    checks.same_device("packed_w", packed_w, x)
    if packed_w.shape[1] != packed_width(k, w_bits):
        raise ValueError(
            f"packed_w must have {packed_width(k, w_bits)} bytes per row for K={k} (x.shape[-1]) at w_bits={w_bits}, "
            f"got shape {tuple(packed_w.shape)}"
        )
    checks.float_tensor("w_scale", w_scale)
    checks.same_device("w_scale", w_scale, x)
    if w_scale.numel() != packed_w.shape[0]:
        raise ValueError(
            f"w_scale must have one entry per output channel ({packed_w.shape[0]}), got shape {tuple(w_scale.shape)}"
        )


def _check_bias(bias, n: int, x: Tensor) -> Tensor | None:
    if bias is None:
        return None
    checks.float_tensor("bias", bias)
    checks.same_device("bias", bias, x)
    if bias.numel() != n:
        raise ValueError(f"bias must have one entry per output channel ({n}), got shape {tuple(bias.shape)}")
    return bias.reshape(-1).float().contiguous()


def packed_linear(
    x: Tensor,
    packed_w: Tensor,
    w_scale: Tensor,
    w_bits: int,
    x_step: Tensor,
    x_bits: int,
    *,
    x_signed: bool = False,
    bias: Tensor | None = None,
) -> Tensor:
    """``F.linear(fake_quant(x, x_step, x_bits), dequant(packed_w) * w_scale) + bias`` with integer arithmetic.

    Args:
        x: float32/float16/bfloat16 activations (..., K), quantized per tensor on the fly.
        packed_w: uint8 (N, packed K): signed weight codes in the canonical layout (``lowbit.pack``).
        w_scale: positive per-output-channel weight steps (N,).
        w_bits: weight bit-width, 2..8.
        x_step: positive activation step, one element.
        x_bits: activation bit-width, 2..8 (unsigned range unless ``x_signed``).
        bias: optional (N,).

    Returns (..., N) in x's dtype. Inference only: no gradient flows through it.
    """
    checks.float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., K), got a 0-d tensor")
    w_bits = checks.bits("w_bits", w_bits)
    x_bits = checks.bits("x_bits", x_bits)
    x_signed = checks.flag("x_signed", x_signed)
    _check_packed_weight(packed_w, w_scale, w_bits, x.shape[-1], x)
    checks.float_tensor("x_step", x_step)
    checks.same_device("x_step", x_step, x)
    if x_step.numel() != 1:
        raise ValueError(f"x_step must have one element (activations are quantized per tensor), got {x_step.numel()}")
    bias = _check_bias(bias, packed_w.shape[0], x)
    return torch.ops.lowbit.packed_linear(
        x, packed_w, w_scale.reshape(-1).float(), w_bits, x_step.reshape(1).float(), x_bits, x_signed, bias
    )


# ---------------------------------------------------------------------------------------------------------------
# The integer data path (issue 17): GEMM and depthwise conv with the folded epilogue, codes in and out
# ---------------------------------------------------------------------------------------------------------------
#
# A packed layer with its batch-norm, bias and activation folded in computes, per output value,
#     v = clamp(float32(acc) * scale[n] + bias[n], lo, hi)          (float32 multiply, then add: two roundings)
# and emits v as float32, or, when the next layer's activation quantizer is fused too, the codes
#     clamp(rint(v / out_step), out_qmin, out_qmax)                 (uint8 when out_qmin >= 0, else int8).
# x is float (quantized on the fly, as packed_linear) or uint8/int8 codes that a previous layer emitted at this
# layer's step. These ops are internal (the packed layers call them with checked arguments) and dispatch like the
# public ones: the C++ CPU backend has kernels for them, every other backend runs the reference
# (lowbit/backends/reference.py: exact integer sums in float64), which the tests hold the kernels to, bit for bit.


def _packed_gemm_impl(x, packed_w, scale, bias, w_bits, x_step, qmin, qmax, lo, hi, out_step, oqmin, oqmax, panel=None):
    backend = select(x.device)
    args = (x.contiguous(), packed_w, scale, bias, w_bits, x_step, qmin, qmax, lo, hi, out_step, oqmin, oqmax)
    # the panel is the C++ CPU kernel's prepacked copy of packed_w; backends without a panel kernel ignore it
    if backend.name == "cpu":
        return backend.kernels.packed_gemm(*args, panel=panel)
    return backend.kernels.packed_gemm(*args)


def _packed_gemm_fake(x, packed_w, scale, bias, w_bits, x_step, qmin, qmax, lo, hi, out_step, oqmin, oqmax, panel=None):
    dtype = code_dtype(oqmin) if out_step > 0 else (torch.float32 if x.dtype in CODE_DTYPES else x.dtype)
    return x.new_empty((x.shape[0], packed_w.shape[0]), dtype=dtype)


def _packed_depthwise_impl(x, w, scale, bias, kernel, stride, padding, dilation, lo, hi, out_step, oqmin, oqmax):
    return select(x.device).kernels.packed_depthwise(
        x, w, scale, bias, kernel, stride, padding, dilation, lo, hi, out_step, oqmin, oqmax
    )


def _depthwise_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _packed_depthwise_fake(x, w, scale, bias, kernel, stride, padding, dilation, lo, hi, out_step, oqmin, oqmax):
    out_h = _depthwise_out(x.shape[1], kernel[0], stride[0], padding[0], dilation[0])
    out_w = _depthwise_out(x.shape[2], kernel[1], stride[1], padding[1], dilation[1])
    dtype = code_dtype(oqmin) if out_step > 0 else torch.float32
    return x.new_empty((x.shape[0], out_h, out_w, x.shape[3]), dtype=dtype)


def _im2col_codes_impl(x, kernel, stride, padding, dilation):
    return select(x.device).kernels.im2col_codes(x.contiguous(), kernel, stride, padding, dilation)


def _im2col_codes_fake(x, kernel, stride, padding, dilation):
    out_h = _depthwise_out(x.shape[1], kernel[0], stride[0], padding[0], dilation[0])
    out_w = _depthwise_out(x.shape[2], kernel[1], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0] * out_h * out_w, kernel[0] * kernel[1] * x.shape[3]))


def _packed_patches_gemm_impl(x, packed_w, scale, bias, w_bits, kernel, stride, padding, dilation, lo, hi, out_step,
                              oqmin, oqmax, panel=None):  # fmt: skip
    backend = select(x.device)
    args = (x.contiguous(), packed_w, scale, bias, w_bits, kernel, stride, padding, dilation, lo, hi, out_step)
    if backend.name == "cpu":
        return backend.kernels.packed_patches_gemm(*args, oqmin, oqmax, panel=panel)
    return backend.kernels.packed_patches_gemm(*args, oqmin, oqmax)


def _packed_patches_gemm_fake(x, packed_w, scale, bias, w_bits, kernel, stride, padding, dilation, lo, hi, out_step,
                              oqmin, oqmax, panel=None):  # fmt: skip
    out_h = _depthwise_out(x.shape[1], kernel[0], stride[0], padding[0], dilation[0])
    out_w = _depthwise_out(x.shape[2], kernel[1], stride[1], padding[1], dilation[1])
    dtype = code_dtype(oqmin) if out_step > 0 else torch.float32
    return x.new_empty((x.shape[0] * out_h * out_w, packed_w.shape[0]), dtype=dtype)


def _quantize_codes_impl(x, step, qmin, qmax):
    return select(x.device).kernels.quantize_codes(x.contiguous(), step, qmin, qmax)


define(
    "packed_gemm(Tensor x, Tensor packed_w, Tensor scale, Tensor? bias, int w_bits, float x_step, int qmin, "
    "int qmax, float lo, float hi, float out_step, int out_qmin, int out_qmax, Tensor? panel=None) -> Tensor",
    _packed_gemm_impl,
    _packed_gemm_fake,
)
define(
    "packed_depthwise(Tensor x, Tensor w, Tensor scale, Tensor? bias, int[] kernel, int[] stride, int[] padding, "
    "int[] dilation, float lo, float hi, float out_step, int out_qmin, int out_qmax) -> Tensor",
    _packed_depthwise_impl,
    _packed_depthwise_fake,
)
define(
    "quantize_codes(Tensor x, float step, int qmin, int qmax) -> Tensor",
    _quantize_codes_impl,
    lambda x, step, qmin, qmax: torch.empty_like(x, dtype=code_dtype(qmin)),
)
define(
    "im2col_codes(Tensor x, int[] kernel, int[] stride, int[] padding, int[] dilation) -> Tensor",
    _im2col_codes_impl,
    _im2col_codes_fake,
)
define(
    "packed_patches_gemm(Tensor x, Tensor packed_w, Tensor scale, Tensor? bias, int w_bits, int[] kernel, "
    "int[] stride, int[] padding, int[] dilation, float lo, float hi, float out_step, int out_qmin, int out_qmax, "
    "Tensor? panel=None) -> Tensor",
    _packed_patches_gemm_impl,
    _packed_patches_gemm_fake,
)
