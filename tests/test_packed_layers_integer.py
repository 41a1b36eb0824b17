"""The integer data path of converted models (issue 17): the kernels against an independent numpy reference,
and fused models against the same models run on the reference backend and against the fake-quant model.

Contract (docs/decisions.md): a fused packed layer computes clamp(float32(acc) * scale + bias, lo, hi) with the
batch-norm folded into scale and bias, then (when its only consumer is a packed layer) that layer's codes
clamp(rint(v / step), qmin, qmax). Every backend gives the same bits; against the unfolded fake-quant model the
logits agree to 1e-4 of their scale (float32 rounding of the folded affine map can move a value across a
quantization tie) and the top-1 class is equal.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE
from packed_models import calibrated_model
from torch import nn

import lowbit
from lowbit.backends import cpu as cpu_backend
from lowbit.core.packing import gemm_panel
from lowbit.models import MODELS
from lowbit.nn.packed import FoldedBatchNorm2d, PackedConv2d
from lowbit.tools.convert import convert, fuse_inference

INF = math.inf
pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the integer data path's kernels are CPU kernels")


# ---------------------------------------------------------------------------------------------------------------
# independent reference: numpy int64 sums, float32 epilogue, numpy's own unpacking
# ---------------------------------------------------------------------------------------------------------------


def np_unpack(packed: torch.Tensor, bits: int, k: int) -> np.ndarray:
    width = {2: 2, 3: 4, 4: 4}.get(bits, 8)
    raw = packed.numpy().astype(np.int64)
    fields = np.stack([(raw >> (width * f)) & ((1 << width) - 1) for f in range(8 // width)], axis=-1)
    fields = fields.reshape(raw.shape[0], -1)[:, :k]
    return np.where(fields >= 1 << (width - 1), fields - (1 << width), fields)


def np_epilogue(acc: np.ndarray, scale, bias, lo, hi, out_step, oqmin, oqmax) -> np.ndarray:
    v = acc.astype(np.float32) * scale.numpy()
    if bias is not None:
        v = v + bias.numpy()
    v = np.minimum(np.maximum(v, np.float32(lo)), np.float32(hi))
    if out_step <= 0:
        return v
    return np.clip(np.rint(v / np.float32(out_step)), oqmin, oqmax).astype(np.int64)


def np_gemm(x, packed, scale, bias, bits, x_step, qmin, qmax, epi):
    if x.dtype in (torch.uint8, torch.int8):
        codes = x.numpy().astype(np.int64)
    else:
        codes = np.clip(np.rint(x.numpy() / np.float32(x_step)), qmin, qmax).astype(np.int64)
    acc = codes @ np_unpack(packed, bits, x.shape[1]).T
    return np_epilogue(acc, scale, bias, *epi)


def as_numpy(y: torch.Tensor) -> np.ndarray:
    return y.numpy().astype(np.int64) if y.dtype in (torch.uint8, torch.int8) else y.numpy()


EPILOGUES = [  # (lo, hi, out_step, out_qmin, out_qmax)
    (-INF, INF, 0.0, 0, 0),  # float out, no clamp
    (0.0, 6.0, 0.0, 0, 0),  # ReLU6, float out
    (0.0, INF, 0.05, 0, 255),  # ReLU, unsigned 8-bit codes out
    (-INF, INF, 0.1, -4, 3),  # signed 3-bit codes out
    (0.0, 6.0, 0.3, 0, 3),  # ReLU6, unsigned 2-bit codes out
    (-INF, -1.0, 0.05, 0, 255),  # every value clamped below the code range: all code 0
    (100.0, INF, 0.05, -128, 127),  # every value clamped above it: all code 127
]


GEMM_SHAPES = [  # (m, k, n, w_bits): M % 4, K % 4 and N % 16 tails of the panel kernel, every weight width
    (1, 7, 5, 4),
    (33, 67, 9, 2),
    (70, 130, 66, 3),
    (5, 300, 17, 8),
    (6, 5, 33, 5),
    (67, 24, 16, 6),
    (3, 129, 48, 7),
    (9, 27, 64, 8),
]


def panel_level() -> bool:
    """The ISA levels of the panel kernel (csrc/cpu/packed_linear.cpp's panel_level): AVX2, and AVX-512 without
    VNNI (whose CPUs keep the VNNI tiles)."""
    isa = cpu_backend.isa()
    return isa == "avx2" or (isa == "avx512" and "avx512_vnni" not in cpu_backend.features())


def panel_runs(backend: str, x: torch.Tensor, epi) -> bool:
    """Whether packed_gemm takes the panel kernel: the C++ backend at a panel level, float32 or code output."""
    float_out_16 = epi[2] == 0 and x.dtype in (torch.float16, torch.bfloat16)
    return backend.startswith("cpu") and panel_level() and not float_out_16


@pytest.mark.parametrize("epi", EPILOGUES, ids=range(len(EPILOGUES)))
@pytest.mark.parametrize(("m", "k", "n", "w_bits"), GEMM_SHAPES)
@pytest.mark.parametrize("x_kind", ["u8 codes", "s8 codes", "float"])
@pytest.mark.parametrize("with_panel", [False, True], ids=["packed", "panel"])
def test_packed_gemm_matches_numpy(backend, epi, m, k, n, w_bits, x_kind, with_panel):
    gen = torch.Generator().manual_seed(m * k + n)
    lo_w, hi_w = lowbit.quant_range(w_bits, True)
    codes = torch.randint(lo_w, hi_w + 1, (n, k), generator=gen, dtype=torch.int8)
    packed = lowbit.pack(codes, w_bits)
    panel = gemm_panel(codes) if with_panel else None
    scale = 0.001 + 0.01 * torch.rand(n, generator=gen)
    bias = torch.randn(n, generator=gen)
    qmin, qmax = (0, 255) if x_kind == "u8 codes" else (-128, 127)
    if x_kind == "float":
        x, x_step = torch.randn(m, k, generator=gen) * 3, 0.03
        x[m // 2, k // 3] = 1e30  # clamps to the range end
    else:
        dtype = torch.uint8 if qmin == 0 else torch.int8
        x, x_step = torch.randint(qmin, qmax + 1, (m, k), generator=gen).to(dtype), 1.0
        x[0, 0] = qmin  # the extreme codes: the panel kernel's int16 pair sums must not saturate
        x[-1, -1] = qmax
    before = cpu_backend.packed_path_counts()["panel"] if backend.startswith("cpu") else 0
    y = torch.ops.lowbit.packed_gemm(x, packed, scale, bias, w_bits, x_step, qmin, qmax, *epi, panel=panel)
    want = np_gemm(x, packed, scale, bias, w_bits, x_step, qmin, qmax, epi)
    np.testing.assert_array_equal(as_numpy(y), want)
    assert y.dtype == (torch.float32 if epi[2] == 0 else (torch.uint8 if epi[3] >= 0 else torch.int8))
    if backend.startswith("cpu"):
        ran = cpu_backend.packed_path_counts()["panel"] - before
        assert ran == int(with_panel and panel_runs(backend, x, epi))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("epi", [EPILOGUES[0], EPILOGUES[3]], ids=["float-out", "codes-out"])
def test_packed_gemm_panel_float_inputs_and_nan_rows(backend, dtype, epi):
    """Float inputs of every dtype through the panel path: quantized once, a NaN row gives a NaN output row (float
    out) or ValueError (codes out), as the reference and the packed path."""
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(-8, 8, (21, 45), generator=gen, dtype=torch.int8)
    packed, panel = lowbit.pack(codes, 4), gemm_panel(codes)
    scale, bias = 0.001 + 0.01 * torch.rand(21, generator=gen), torch.randn(21, generator=gen)
    x = (torch.randn(13, 45, generator=gen) * 3).to(dtype)
    args = (packed, scale, bias, 4, 0.03, 0, 15, *epi)
    want = np_gemm(x.float(), packed, scale, bias, 4, 0.03, 0, 15, epi)
    y = torch.ops.lowbit.packed_gemm(x, *args, panel=panel)
    if epi[2] == 0:  # float output in x's dtype: the float32 epilogue, rounded once
        want = torch.from_numpy(want).to(dtype).float().numpy()
    np.testing.assert_array_equal(as_numpy(y.float() if epi[2] == 0 else y), want)
    x[4, 9] = float("nan")
    if epi[2] > 0:
        with pytest.raises(ValueError, match="NaN"):
            torch.ops.lowbit.packed_gemm(x, *args, panel=panel)
        return
    y = torch.ops.lowbit.packed_gemm(x, *args, panel=panel)
    assert bool(torch.isnan(y[4]).all()) and not bool(torch.isnan(y[:4]).any())


@pytest.mark.parametrize("kind", ["gemm", "depthwise"])
def test_non_finite_scale_gives_nan_as_the_reference(backend, kind):
    """An infinite scale times a zero sum is NaN: float output keeps it, code output raises (the AVX2 epilogues
    skip the NaN test only when every scale and bias is finite)."""
    scale, bias = torch.full((16,), 0.01), torch.zeros(16)
    scale[5] = math.inf
    x = torch.zeros(3, 16, dtype=torch.uint8)  # zero sums: inf * 0
    codes = torch.randint(-8, 8, (16, 16), dtype=torch.int8, generator=torch.Generator().manual_seed(5))

    def run(epi):
        if kind == "gemm":
            packed = lowbit.pack(codes, 4)
            return torch.ops.lowbit.packed_gemm(x, packed, scale, bias, 4, 1.0, 0, 255, *epi, panel=gemm_panel(codes))
        pixels, taps = x.view(1, 3, 1, 16), codes[:1].contiguous()
        return torch.ops.lowbit.packed_depthwise(pixels, taps, scale, bias, [1, 1], [1, 1], [0, 0], [1, 1], *epi)

    y = run(EPILOGUES[0])
    assert bool(torch.isnan(y[..., 5]).all()) and not bool(torch.isnan(y[..., :5]).any())
    with pytest.raises(ValueError, match="NaN"):
        run(EPILOGUES[2])


@pytest.mark.parametrize("signed", [False, True])
def test_packed_gemm_without_bias_keeps_negative_zero(backend, signed):
    """No bias: float32(acc) * scale is the output, so a zero sum times a negative scale stays -0.0 (an added
    +0.0 would turn it +0.0); compared bit for bit, whole 16-channel blocks and a partial one."""
    gen = torch.Generator().manual_seed(11)
    codes = torch.randint(-8, 8, (35, 40), generator=gen, dtype=torch.int8)
    scale = -(0.001 + 0.01 * torch.rand(35, generator=gen))
    x = torch.randint(0, 16, (9, 40), generator=gen).to(torch.int8 if signed else torch.uint8)
    x[3] = 0  # zero sums
    qmin, qmax = (-128, 127) if signed else (0, 255)
    epi = EPILOGUES[0]
    y = torch.ops.lowbit.packed_gemm(x, lowbit.pack(codes, 4), scale, None, 4, 1.0, qmin, qmax, *epi,
                                     panel=gemm_panel(codes))  # fmt: skip
    want = np_gemm(x, lowbit.pack(codes, 4), scale, None, 4, 1.0, qmin, qmax, epi)
    assert np.signbit(want[3]).all()
    np.testing.assert_array_equal(y.numpy().view(np.int32), want.view(np.int32))


def test_gemm_panel_layout():
    """gemm_panel against its definition, element by element (csrc/cpu/packed_panel.h)."""
    codes = torch.randint(-64, 64, (37, 10), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    panel = gemm_panel(codes)
    assert panel.shape == (3, 3 * 64) and panel.dtype == torch.uint8
    view = panel.view(torch.int8)
    for p in range(3):
        for q in range(3):
            for c in range(16):
                for t in range(4):
                    n, k = 16 * p + c, 4 * q + t
                    want = int(codes[n, k]) if n < 37 and k < 10 else 0
                    assert int(view[p, q * 64 + (c // 8) * 32 + (c % 8) * 4 + t]) == want


def np_depthwise(x, w, scale, bias, kernel, stride, padding, dilation, epi):
    b, h, wd, c = x.shape
    xp = np.pad(x.numpy().astype(np.int64), ((0, 0), (padding[0],) * 2, (padding[1],) * 2, (0, 0)))
    out_h = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (wd + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    acc = np.zeros((b, out_h, out_w, c), np.int64)
    taps = w.numpy().astype(np.int64).reshape(kernel[0], kernel[1], c)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_h - 1) + 1, stride[0])
            cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_w - 1) + 1, stride[1])
            acc += xp[:, rows, cols, :] * taps[i, j]
    return np_epilogue(acc, scale, bias, *epi)


DEPTHWISE = [  # (batch, h, w, c, kernel, stride, padding, dilation)
    (1, 7, 5, 3, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 9, 8, 17, (3, 3), (2, 2), (1, 1), (1, 1)),
    (3, 6, 11, 33, (5, 3), (1, 2), (2, 0), (1, 2)),
    (0, 5, 5, 4, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 6, 5, 48, (3, 3), (1, 1), (1, 1), (1, 1)),  # whole 16-channel vectors only
    (1, 4, 4, 16, (9, 9), (1, 1), (4, 4), (1, 1)),  # 81 taps: more than the AVX2 rows' tap list
]


@pytest.mark.parametrize("epi", EPILOGUES, ids=range(len(EPILOGUES)))
@pytest.mark.parametrize("case", DEPTHWISE, ids=range(len(DEPTHWISE)))
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("w_bits", [8, 4])  # 4: the AVX2 rows sum in int16 (every tap sum fits)
def test_packed_depthwise_matches_numpy(backend, epi, case, signed, w_bits):
    b, h, w, c, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(h * w + c)
    lo, hi = (-128, 127) if signed else (0, 255)
    x = torch.randint(lo, hi + 1, (b, h, w, c), generator=gen).to(torch.int8 if signed else torch.uint8)
    if x.numel():
        x.view(-1)[0], x.view(-1)[-1] = lo, hi  # extreme codes
    w_lo, w_hi = lowbit.quant_range(w_bits, True)
    weight = torch.randint(w_lo, w_hi + 1, (kernel[0] * kernel[1], c), generator=gen, dtype=torch.int8)
    weight[0, 0] = w_lo
    scale, bias = 0.0001 + 0.001 * torch.rand(c, generator=gen), torch.randn(c, generator=gen)
    y = torch.ops.lowbit.packed_depthwise(
        x, weight, scale, bias, list(kernel), list(stride), list(padding), list(dilation), *epi
    )
    np.testing.assert_array_equal(
        as_numpy(y), np_depthwise(x, weight, scale, bias, kernel, stride, padding, dilation, epi)
    )


@pytest.mark.parametrize("case", DEPTHWISE, ids=range(len(DEPTHWISE)))
@pytest.mark.parametrize("signed", [False, True])
def test_im2col_codes_matches_numpy(backend, case, signed):
    b, h, w, c, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(h + w * c)
    lo, hi = (-128, 127) if signed else (0, 255)
    x = torch.randint(lo, hi + 1, (b, h, w, c), generator=gen).to(torch.int8 if signed else torch.uint8)
    y = torch.ops.lowbit.im2col_codes(x, list(kernel), list(stride), list(padding), list(dilation))
    xp = np.pad(x.numpy(), ((0, 0), (padding[0],) * 2, (padding[1],) * 2, (0, 0)))
    out_h = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    want = np.zeros((b, out_h, out_w, kernel[0], kernel[1], c), x.numpy().dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_h - 1) + 1, stride[0])
            cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_w - 1) + 1, stride[1])
            want[:, :, :, i, j] = xp[:, rows, cols, :]
    assert y.dtype == x.dtype
    np.testing.assert_array_equal(y.numpy(), want.reshape(b * out_h * out_w, kernel[0] * kernel[1] * c))


@pytest.mark.parametrize("case", DEPTHWISE, ids=range(len(DEPTHWISE)))
@pytest.mark.parametrize(("signed", "w_bits", "epi"), [(False, 4, EPILOGUES[2]), (True, 3, EPILOGUES[3]),
                                                       (False, 8, EPILOGUES[1]), (True, 6, EPILOGUES[0])])  # fmt: skip
@pytest.mark.parametrize("with_panel", [False, True], ids=["packed", "panel"])
def test_packed_patches_gemm_matches_numpy(backend, case, signed, w_bits, epi, with_panel):
    """The kxk conv of codes (patches gathered per block of rows by the panel path) against numpy's patches @ W."""
    b, h, w, c, kernel, stride, padding, dilation = case
    gen = torch.Generator().manual_seed(h * c + w_bits)
    lo, hi = (-128, 127) if signed else (0, 255)
    x = torch.randint(lo, hi + 1, (b, h, w, c), generator=gen).to(torch.int8 if signed else torch.uint8)
    k = kernel[0] * kernel[1] * c
    n = 21
    w_lo, w_hi = lowbit.quant_range(w_bits, True)
    codes = torch.randint(w_lo, w_hi + 1, (n, k), generator=gen, dtype=torch.int8)
    packed, panel = lowbit.pack(codes, w_bits), gemm_panel(codes) if with_panel else None
    scale, bias = 0.0001 + 0.001 * torch.rand(n, generator=gen), torch.randn(n, generator=gen)
    geometry = (list(kernel), list(stride), list(padding), list(dilation))
    before = cpu_backend.packed_path_counts()["panel"] if backend.startswith("cpu") else 0
    y = torch.ops.lowbit.packed_patches_gemm(x, packed, scale, bias, w_bits, *geometry, *epi, panel=panel)
    patches = torch.ops.lowbit.im2col_codes(x, *geometry)  # itself held to numpy in test_im2col_codes_matches_numpy
    want = np_gemm(patches, packed, scale, bias, w_bits, 1.0, lo, hi, epi)
    np.testing.assert_array_equal(as_numpy(y), want)
    if backend.startswith("cpu") and b > 0:
        ran = cpu_backend.packed_path_counts()["panel"] - before
        assert ran == int(with_panel and panel_level())


def test_quantize_codes_and_nan(backend):
    x = torch.tensor([[-1.0, 0.25, 0.75, 2.5, 1e9, -0.25]])
    codes = torch.ops.lowbit.quantize_codes(x, 0.5, 0, 15)
    assert codes.dtype == torch.uint8 and codes.tolist() == [[0, 0, 2, 5, 15, 0]]  # 0.5 and 1.5 round to even
    assert torch.ops.lowbit.quantize_codes(x, 0.5, -8, 7).tolist() == [[-2, 0, 2, 5, 7, 0]]
    with pytest.raises(ValueError, match="NaN"):
        torch.ops.lowbit.quantize_codes(torch.tensor([1.0, float("nan")]), 0.5, 0, 15)
    # whole vectors of 8 and a tail, ties, both ranges, infinities; NaN in a vector lane
    x = torch.cat([torch.arange(-40, 41) * 0.25, torch.tensor([math.inf, -math.inf, 1e30, 3.75, 0.75])]).reshape(2, -1)
    for qmin, qmax in [(0, 255), (-128, 127), (-4, 3)]:
        want = np.clip(np.rint(x.numpy() / np.float32(0.5)), qmin, qmax)
        np.testing.assert_array_equal(as_numpy(torch.ops.lowbit.quantize_codes(x, 0.5, qmin, qmax)), want)
    with pytest.raises(ValueError, match="NaN"):
        torch.ops.lowbit.quantize_codes(torch.tensor([1.0] * 11 + [float("nan")] + [2.0] * 4), 0.5, 0, 15)


# ---------------------------------------------------------------------------------------------------------------
# fused models: every packaged model, mixed per-layer bit plans
# ---------------------------------------------------------------------------------------------------------------

SIZES = {"small_cnn": ({"width": 8}, 8), "resnet18": ({"width_mult": 0.25, "small_input": True}, 16)}
SIZES.update({name: ({"width_mult": 0.25, "small_input": True}, 16) for name in ("mobilenet_v2", "mobilenet_v3_small")})
PLANS = {  # (weight bits, activation bits) cycled over the layers; first and last layer at 8 in "first-last-8"
    "w2-8 a2-8": ((2, 3, 4, 5, 6, 7, 8), (8, 7, 6, 5, 4, 3, 2)),
    "w4a8 first-last-8": ((4,), (8,)),
}


def calibrated(name: str, plan: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    kwargs, size = SIZES[name]
    w_bits, a_bits = PLANS[plan]
    return calibrated_model(
        name, kwargs, size, w_bits, a_bits, seed=seed, keep_first_last=plan.endswith("first-last-8")
    )


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_model_is_the_same_on_every_backend_and_keeps_top1(name, plan):
    model, x = calibrated(name, plan)
    fused, report = convert(model, return_report=True)
    assert not report.not_fused
    with torch.no_grad():
        ref = model(x)
        outs = {}
        for variant in ("reference", "cpu"):
            with lowbit.use_backend(variant):
                outs[variant] = fused(x)
    assert torch.equal(outs["cpu"], outs["reference"]), "the fused model must give the same bits on every backend"
    assert ref.std() > 0
    # Against the fake-quant model: the same logits, except that the fake-quant model's float convolutions round
    # differently on different CPUs (oneDNN's AVX-512 and AVX2 kernels), and where that moves a value across a
    # rounding tie one code differs and that sample's logits with it (seen on an Intel AVX-512 machine: one
    # sample in eight for ResNet-18, none with ONEDNN_MAX_CPU_ISA=AVX2). So at most one sample may differ.
    close = ((outs["cpu"] - ref).abs() <= 1e-4 * ref.abs() + 1e-4 * float(ref.abs().max())).all(1)
    assert int((~close).sum()) <= 1, f"samples off the fake-quant model: {(~close).nonzero().flatten().tolist()}"
    assert torch.equal(outs["cpu"].argmax(1)[close], ref.argmax(1)[close])
    if name in ("resnet18", "mobilenet_v2"):  # the chains the integer data path exists for
        assert any("codes for" in what for _, what in report.fused)
        assert any(isinstance(m, FoldedBatchNorm2d) for m in fused.modules())


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_fused_model_is_the_same_on_every_isa(isa):
    if isa not in cpu_backend.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} path")
    model, x = calibrated("mobilenet_v2", "w2-8 a2-8")
    fused = convert(model)
    previous = cpu_backend.isa()
    with torch.no_grad():
        want = fused(x)
        cpu_backend.set_isa(isa)
        try:
            got = fused(x)
        finally:
            cpu_backend.set_isa(previous)
    assert torch.equal(got, want)


def test_fused_layer_equals_its_folded_fake_quant_chain():
    """One fused chain (conv -> BN -> ReLU -> next quantizer) against the fake-quant modules it replaces, with the
    batch-norm folded the same way: codes equal except where float32 rounding of the fold crosses a tie."""
    model, x = calibrated("resnet18", "w4a8 first-last-8")
    fused = convert(model)
    conv, bn, relu = model.layer1[0].conv1, model.layer1[0].bn1, model.layer1[0].relu1
    consumer = model.layer1[0].conv2.act_quant
    inputs = {}
    hook = model.layer1[0].conv1.register_forward_pre_hook(lambda mod, args: inputs.setdefault("x", args[0]))
    with torch.no_grad():
        model(x)
        hook.remove()
        want = torch.round(relu(bn(conv(inputs["x"]))) / consumer.step).clamp(*lowbit.quant_range(8, False))
        got = fused.layer1[0].conv1(inputs["x"])
    assert got.dtype == torch.uint8
    diff = (got.float() - want).abs()
    assert diff.max() <= 1 and diff.mean() < 1e-3


def test_fused_model_survives_save_load_and_state_dict_reload(tmp_path):
    model, x = calibrated("mobilenet_v2", "w4a8 first-last-8")
    fused = convert(model)
    path = tmp_path / "m.safetensors"
    lowbit.save(fused, path)
    loaded = lowbit.load(path)
    assert any(isinstance(m, FoldedBatchNorm2d) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(x), fused(x))
        clone = copy.deepcopy(fused)
        clone.load_state_dict(fused.state_dict())
        assert torch.equal(clone(x), fused(x))
    assert fuse_inference(loaded) == fuse_inference(loaded)  # idempotent


def test_unfused_and_fused_convert_agree_and_fuse_false_keeps_batch_norm():
    model, x = calibrated("resnet18", "w4a8 first-last-8")
    plain = convert(model, fuse=False)
    assert not any(isinstance(m, FoldedBatchNorm2d) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), convert(model)(x), rtol=1e-4, atol=1e-4 * float(plain(x).abs().max()))
    with pytest.raises(TypeError, match="fuse"):
        convert(model, fuse=1)


@pytest.mark.parametrize("batch", [0, 1, 3])
def test_fused_model_batch_sizes(batch):
    model, _ = calibrated("mobilenet_v2", "w4a8 first-last-8")
    fused = convert(model)
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        out = fused(x)
        with lowbit.use_backend("reference"):
            ref = fused(x)
    assert out.shape == (batch, 10) and torch.equal(out, ref)


def test_codes_of_the_wrong_kind_are_rejected():
    layer = PackedConv2d(4, 6, 3, padding=1, w_bits=4, a_bits=8, a_signed=False)
    with pytest.raises(TypeError, match="uint8"):
        layer(torch.zeros(1, 4, 5, 5, dtype=torch.int8))
    reflect = PackedConv2d(4, 6, 3, padding=1, padding_mode="reflect", w_bits=4, a_bits=8)
    with pytest.raises(ValueError, match="float input"):
        reflect(torch.zeros(1, 4, 5, 5, dtype=torch.uint8))


def test_fused_model_compiles_fullgraph():
    model, x = calibrated("mobilenet_v2", "w4a8 first-last-8")
    fused = convert(model)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), fused(x))
