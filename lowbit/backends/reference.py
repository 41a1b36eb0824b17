"""The reference backend: SPEC sections 1, 2 and 4 written as plain PyTorch ops, one function per kernel.

It is the readable statement of the math and the fallback for any device; its packed data-path functions
(``packed_gemm``, ``packed_depthwise``, ``quantize_codes``, ``im2col_codes``) also serve the CUDA and Triton
backends, which have no kernels of their own for them. It is *not* what the tests compare
against (they carry their own float64 reference), and it is slow: every line below is a full pass over memory
and most allocate an element-sized temporary, which is what the fused kernels avoid.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lowbit.backends import Backend
from lowbit.core import checks
from lowbit.core.packing import CODE_DTYPES, code_dtype, unpack_codes


def availability() -> tuple[bool, str]:
    return True, "plain PyTorch ops: the readable statement of SPEC, slow"


def _channel_view(x: torch.Tensor, param: torch.Tensor, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as (outer, C, inner) float32 and ``param`` shaped to broadcast over it."""
    channels = param.numel()
    return x.float().reshape(-1, channels, inner), param.view(1, channels, 1)


def fake_quant_forward(x, step, offset, qmin: int, qmax: int, inner: int) -> torch.Tensor:
    check_fake_quant_values(step, offset)
    xf, s = _channel_view(x, step, inner)
    beta = 0.0 if offset is None else offset.view(1, -1, 1)
    v = (xf - beta) / s
    y = torch.clamp(torch.round(v), qmin, qmax) * s + beta
    return y.reshape(x.shape).to(x.dtype)


def check_fake_quant_values(step, offset) -> None:
    """SPEC section 6's value rules, checked by the forward launchers of the Python backends (the backward gets the
    values its forward accepted)."""
    checks.step_values("step", step)
    if offset is not None:
        checks.finite_values("offset", offset)


def fake_quant_backward(grad, x, step, offset, qmin: int, qmax: int, inner: int, grad_scale: float):
    xf, s = _channel_view(x, step, inner)
    g = grad.float().reshape(xf.shape)
    beta = 0.0 if offset is None else offset.view(1, -1, 1)
    v = (xf - beta) / s
    inside = (v >= qmin) & (v <= qmax)
    outside_value = torch.where(v < qmin, float(qmin), float(qmax))
    dq_ds = torch.where(inside, torch.round(v) - v, outside_value)
    dx = (g * inside).reshape(x.shape).to(x.dtype)
    dstep = (g * dq_ds).sum(dim=(0, 2)) * grad_scale
    doffset = (g * ~inside).sum(dim=(0, 2)) * grad_scale
    return dx, dstep, doffset


def _branch_codes(xf, step, qmin: int, qmax: int):
    v = xf / step
    rounded = torch.round(v)
    return v, rounded, torch.clamp(rounded, qmin, qmax)


def check_multi_branch_values(steps, probs) -> None:
    """The value rules of the multi-branch quantizer, as ``check_fake_quant_values``."""
    checks.step_values("steps", steps)
    checks.finite_values("probs", probs)


def multi_branch_fake_quant_forward(x, steps, probs, qmin: list[int], qmax: list[int]) -> torch.Tensor:
    """The aggregated form: every branch quantizes x, the results are weighted and summed in branch order."""
    check_multi_branch_values(steps, probs)
    xf = x.float()
    y = torch.zeros_like(xf)
    for step, prob, lo, hi in zip(steps, probs, qmin, qmax, strict=True):
        y = y + prob * (_branch_codes(xf, step, lo, hi)[2] * step)
    return y.to(x.dtype)


def multi_branch_fake_quant_backward(grad, x, steps, probs, qmin: list[int], qmax: list[int], grad_scale: list[float]):
    xf, g = x.float(), grad.float()
    coef = torch.zeros_like(xf)
    dsteps, dprobs = [], []
    for step, prob, lo, hi, gs in zip(steps, probs, qmin, qmax, grad_scale, strict=True):
        v, rounded, q = _branch_codes(xf, step, lo, hi)
        inside = (v >= lo) & (v <= hi)
        dq_ds = torch.where(inside, rounded - v, torch.where(v < lo, float(lo), float(hi)))
        coef = coef + prob * inside
        dsteps.append(prob * gs * (g * dq_ds).sum(dtype=torch.float64))
        dprobs.append((g * q * step).sum(dtype=torch.float64))
    dx = (g * coef).to(x.dtype)
    return dx, torch.stack(dsteps).float(), torch.stack(dprobs).float()


def check_packed_linear_values(x_step, w_scale) -> None:
    checks.step_values("x_step", x_step)
    checks.step_values("w_scale", w_scale)


def packed_linear(x, packed_w, w_scale, w_bits: int, x_step, qmin: int, qmax: int, bias) -> torch.Tensor:
    """SPEC section 4 as plain ops: quantize x, unpack W, exact integer dot products (float64 holds every
    partial sum of K <= 2^20 8-bit products exactly), then the float32 epilogue every backend shares."""
    check_packed_linear_values(x_step, w_scale)
    xf = x.float()
    qx = torch.clamp(torch.round(xf / x_step), qmin, qmax)
    qw = unpack_codes(packed_w, w_bits, x.shape[-1], signed=True)
    acc = (qx.double() @ qw.double().t()).float()
    y = acc * (x_step * w_scale)
    if bias is not None:
        y = y + bias
    y = torch.where(torch.isnan(xf).any(dim=1, keepdim=True), float("nan"), y)
    return y.to(x.dtype)


# The integer data path (issue 17): GEMM and depthwise conv with the folded epilogue, codes in and out. A packed
# layer with its batch-norm, bias and activation folded in computes, per output value,
#     v = clamp(float32(acc) * scale[n] + bias[n], lo, hi)          (float32 multiply, then add: two roundings)
# and emits v as float32, or, when the next layer's activation quantizer is fused too, the codes
#     clamp(rint(v / out_step), out_qmin, out_qmax)                 (uint8 when out_qmin >= 0, else int8).
# x is float (quantized on the fly, as packed_linear) or uint8/int8 codes that a previous layer emitted at this
# layer's step. Integer sums are exact in float64, so the C++ kernels must match these bit for bit.


def _codes(x: torch.Tensor, x_step: float, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(float64 codes, NaN mask or None) of x: its codes as they are, or SPEC section 1's quantization."""
    if x.dtype in CODE_DTYPES:
        return x.double(), None
    xf = x.float()
    q = torch.clamp(torch.round(xf / torch.tensor(x_step, dtype=torch.float32, device=x.device)), qmin, qmax)
    return torch.nan_to_num(q, nan=0.0).double(), torch.isnan(xf)


def _epilogue(acc: torch.Tensor, scale, bias, lo, hi, out_step, out_qmin, out_qmax, float_dtype) -> torch.Tensor:
    v = acc.float() * scale
    if bias is not None:
        v = v + bias
    v = torch.clamp(v, lo, hi)
    if out_step <= 0:
        return v.to(float_dtype)
    q = torch.round(v / torch.tensor(out_step, dtype=torch.float32, device=v.device))
    if bool(torch.isnan(q).any()):
        raise ValueError("x holds NaN, which no activation code can represent")
    return q.clamp(out_qmin, out_qmax).to(code_dtype(out_qmin))


def packed_gemm(x, packed_w, scale, bias, w_bits, x_step, qmin, qmax, lo, hi, out_step, out_qmin, out_qmax):
    codes, nan = _codes(x, x_step, qmin, qmax)
    qw = unpack_codes(packed_w, w_bits, x.shape[-1], signed=True)
    acc = codes @ qw.double().t()
    if nan is not None:
        acc = torch.where(nan.any(dim=1, keepdim=True), float("nan"), acc)
    float_dtype = torch.float32 if x.dtype in CODE_DTYPES else x.dtype
    return _epilogue(acc, scale, bias, lo, hi, out_step, out_qmin, out_qmax, float_dtype)


def packed_depthwise(x, w, scale, bias, kernel, stride, padding, dilation, lo, hi, out_step, out_qmin, out_qmax):
    channels = x.shape[-1]
    weight = w.double().t().reshape(channels, 1, *kernel)
    acc = torch.nn.functional.conv2d(
        x.double().permute(0, 3, 1, 2), weight, None, stride, padding, dilation, channels
    ).permute(0, 2, 3, 1)
    return _epilogue(acc, scale, bias, lo, hi, out_step, out_qmin, out_qmax, torch.float32)


def quantize_codes(x, step: float, qmin: int, qmax: int) -> torch.Tensor:
    codes, nan = _codes(x, step, qmin, qmax)
    if bool(nan.any()):
        raise ValueError("x holds NaN, which no activation code can represent")
    return codes.to(code_dtype(qmin))


def im2col_codes(x, kernel, stride, padding, dilation) -> torch.Tensor:
    """Patches of channels-last codes x (B, H, W, C), zero-padded: (B * Ho * Wo, kh * kw * C), K in (kh, kw, C)
    order. The padded codes are written once; a strided view of them is the patch tensor, gathered by one copy."""
    batch, height, width, channels = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        padded = x.new_zeros(batch, height + 2 * ph, width + 2 * pw, channels)
        padded[:, ph : ph + height, pw : pw + width] = x
        x = padded
    out_h = (x.shape[1] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
    s_b, s_h, s_w, _ = x.stride()
    patches = x.as_strided((batch, out_h, out_w, kh, kw, channels), (s_b, s_h * sh, s_w * sw, s_h * dh, s_w * dw, 1))
    return patches.reshape(batch * out_h * out_w, kh * kw * channels)


def packed_patches_gemm(x, packed_w, scale, bias, w_bits, kernel, stride, padding, dilation, lo, hi, out_step,
                        out_qmin, out_qmax):  # fmt: skip
    """packed_gemm of the patches of codes x (B, H, W, C): a kxk convolution of the integer data path."""
    qmin, qmax = (-128, 127) if x.dtype == torch.int8 else (0, 255)  # codes are taken as they are
    patches = im2col_codes(x, kernel, stride, padding, dilation)
    return packed_gemm(patches, packed_w, scale, bias, w_bits, 1.0, qmin, qmax, lo, hi, out_step, out_qmin, out_qmax)


# The packed data path's kernels of the backends that have none of their own (CUDA, Triton).
PACKED_DATA_PATH = SimpleNamespace(
    packed_gemm=packed_gemm,
    packed_depthwise=packed_depthwise,
    quantize_codes=quantize_codes,
    im2col_codes=im2col_codes,
    packed_patches_gemm=packed_patches_gemm,
)

BACKEND = Backend(
    name="reference",
    devices=("cpu", "cuda"),
    availability=availability,
    kernels=SimpleNamespace(
        fake_quant_forward=fake_quant_forward,
        fake_quant_backward=fake_quant_backward,
        multi_branch_fake_quant_forward=multi_branch_fake_quant_forward,
        multi_branch_fake_quant_backward=multi_branch_fake_quant_backward,
        packed_linear=packed_linear,
        **vars(PACKED_DATA_PATH),
    ),
)
