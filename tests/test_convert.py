"""lowbit.convert, the packed layers and lowbit.save / lowbit.load (issue 5 "Model conversion", issue 9 faults).

Every comparison is against the fake-quant model in eval mode: per layer within SPEC section 4's float32-rounding
tolerance (relative 1e-5), end to end with a small tolerance and equal top-1. Models are tiny (widths 4..16, 8x8
and 16x16 inputs) so the file runs in seconds on one core.
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import warnings

import pytest
import torch
from packed_models import calibrated_model
from torch import nn

import lowbit
from lowbit.mixquant.quantizers import MinMaxPTQ
from lowbit.models import create_model
from lowbit.nn import MultiBranchQConv2d, QConv2d, QLinear
from lowbit.nn.packed import DequantConv2d, DequantLinear, PackedConv2d, PackedLinear
from lowbit.tools.bops import float_parameter_bytes, weight_bytes
from lowbit.tools.convert import ConvertReport, convert
from lowbit.tools.serialization import checksum, load, save

W_BITS = (2, 3, 4, 8, 5, 6, 7)
A_BITS = (8, 4, 3, 6, 2, 5)

MODELS = {
    "small_cnn": ({"width": 8}, 8),
    "resnet18": ({"width_mult": 0.125, "small_input": True}, 16),
    "mobilenet_v2": ({"width_mult": 0.25, "small_input": True}, 16),
    "mobilenet_v3_small": ({"width_mult": 0.25, "small_input": True}, 16),
}


def _close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """SPEC section 4: float32 rounding, relative to the output's scale (a sum of K products can cancel)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    torch.testing.assert_close(out, ref, rtol=rel, atol=rel * max(scale, 1e-30))


def _calibrated(name: str, *, seed: int = 0, first_float: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """A tiny packaged model at mixed per-layer bits (W_BITS, A_BITS cycled), calibrated, in eval mode;
    ``first_float``: its second layer takes a float input (DequantConv2d)."""
    kwargs, size = MODELS[name]
    return calibrated_model(name, kwargs, size, W_BITS, A_BITS, seed=seed, float_input_layer=1 if first_float else None)


# ---------------------------------------------------------------------------------------------------------------
# conversion of the packaged models
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_packaged_model_matches_fake_quant(name):
    model, x = _calibrated(name, first_float=True)
    packed, report = convert(model, return_report=True)
    with torch.no_grad():
        ref, out = model(x), packed(x)
    assert ref.std() > 0, "degenerate logits: the test would prove nothing"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert not any(isinstance(m, (QConv2d, QLinear)) for m in packed.modules())
    assert any(isinstance(m, (QConv2d, QLinear)) for m in model.modules()), "convert must not touch its input"
    kinds = {type(m) for m in packed.modules()}
    assert {PackedConv2d, PackedLinear, DequantConv2d} <= kinds
    signs = {m.a_signed for m in packed.modules() if isinstance(m, (PackedConv2d, PackedLinear))}
    assert signs == {True, False}
    assert {m.w_bits for m in packed.modules() if hasattr(m, "w_bits")} >= {2, 3, 4, 8}
    assert len(report.converted) == sum(isinstance(m, (QConv2d, QLinear)) for m in model.modules())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_each_layer_matches_its_fake_quant_layer(name):
    """Per layer, on the layer's real input: SPEC section 4's tolerance (relative 1e-5). Unfused: a fused layer's
    output includes its batch-norm and activation (tested against the folded reference below)."""
    model, x = _calibrated(name)
    packed = convert(model, fuse=False)
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0]))
        for n, m in model.named_modules()
        if isinstance(m, (QConv2d, QLinear))
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for layer_name, layer_input in inputs.items():
            _close(packed.get_submodule(layer_name)(layer_input), model.get_submodule(layer_name)(layer_input))


def test_depthwise_layers_run_the_integer_kernel():
    """Depthwise convs run the integer depthwise kernel: SPEC section 4's tolerance against the fake-quant layer,
    and the report says how they run."""
    model, x = _calibrated("mobilenet_v2")
    packed, report = convert(model, return_report=True, fuse=False)
    depthwise = [n for n, m in packed.named_modules() if isinstance(m, PackedConv2d) and m.path == "depthwise"]
    assert depthwise
    layer_input = torch.rand(2, packed.get_submodule(depthwise[0]).in_channels, 8, 8)
    with torch.no_grad():
        _close(packed.get_submodule(depthwise[0])(layer_input), model.get_submodule(depthwise[0])(layer_input))
    assert all("integer depthwise" in how for name, _, _, how in report.converted if name in depthwise)


# ---------------------------------------------------------------------------------------------------------------
# single layers, odd shapes
# ---------------------------------------------------------------------------------------------------------------

CONVS = [
    # (in, out, kernel, extra nn.Conv2d kwargs)
    (3, 5, 3, {"padding": 1}),
    (4, 6, 1, {}),
    (4, 6, 1, {"stride": 2, "padding": 1, "bias": False}),
    (5, 7, 3, {"stride": 2, "padding": 0}),
    (3, 4, (3, 1), {"padding": (2, 0), "dilation": 2}),
    (6, 4, 3, {"groups": 2, "padding": 1, "stride": 2}),
    (6, 9, 1, {"groups": 3}),
    (8, 8, 3, {"groups": 8, "padding": 1, "bias": False}),
    (4, 8, 5, {"groups": 4, "padding": 2, "stride": 2}),
    (3, 5, 4, {"padding": "same"}),
    (3, 5, 3, {"padding": 1, "padding_mode": "reflect"}),
    (3, 5, 2, {"padding": 1, "padding_mode": "replicate", "stride": (1, 2)}),
]


def _q_layer(layer: nn.Module, x: torch.Tensor, w_bits: int, a_bits: int | None, signed: bool) -> nn.Module:
    torch.manual_seed(1)
    cls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
    q = cls.from_float(layer, w_bits=w_bits, a_bits=a_bits, a_signed=signed if a_bits else None)
    with torch.no_grad():
        q(x)  # initialise the steps
    return q.eval()


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize(("w_bits", "a_bits", "signed"), [(4, 8, False), (2, 3, True), (8, 4, True), (3, None, False)])
def test_packed_conv2d_matches_qconv2d(case, w_bits, a_bits, signed):
    cin, cout, kernel, kwargs = CONVS[case]
    torch.manual_seed(case)
    x = torch.randn(2, cin, 9, 7) if signed else torch.rand(2, cin, 9, 7)
    q = _q_layer(nn.Conv2d(cin, cout, kernel, **kwargs), x, w_bits, a_bits, signed)
    packed = convert(q)
    assert isinstance(packed, PackedConv2d if a_bits else DequantConv2d)
    with torch.no_grad():
        ref, out = q(x), packed(x)
        _close(out, ref)
        _close(packed(x[0]), q(x[0]))  # unbatched input, as nn.Conv2d takes it
        _close(packed(x.contiguous(memory_format=torch.channels_last)), ref)
    if a_bits is None:
        assert torch.equal(out, ref)  # a float input runs the fake-quant layer's own conv


@pytest.mark.parametrize("k", [1, 3, 17, 1000])
@pytest.mark.parametrize(("w_bits", "a_bits", "signed"), [(4, 8, True), (2, 8, False), (3, 2, True), (7, None, False)])
def test_packed_linear_matches_qlinear(k, w_bits, a_bits, signed):
    torch.manual_seed(k)
    x = torch.randn(3, 2, k) if signed else torch.rand(3, 2, k)
    q = _q_layer(nn.Linear(k, 5, bias=k % 2 == 1), x, w_bits, a_bits, signed)
    packed = convert(q)
    assert isinstance(packed, PackedLinear if a_bits else DequantLinear)
    with torch.no_grad():
        _close(packed(x), q(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_layers_return_the_input_dtype(dtype):
    x = torch.rand(2, 4, 6, 6)
    for layer in (nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 6, 1)):
        packed = convert(_q_layer(layer, x, 4, 8, False))
        assert packed(x.to(dtype)).dtype == dtype
    linear = convert(_q_layer(nn.Linear(6, 3), x, 4, 8, False))
    assert linear(x.to(dtype)).dtype == dtype


def test_weight_codes_are_the_lsq_codes():
    """codes * w_step reproduces lowbit.fake_quant's weight bit for bit, for every width."""
    x = torch.randn(2, 5, 6, 6)
    for bits in range(2, 9):
        q = _q_layer(nn.Conv2d(5, 7, 3), x, bits, 8, True)
        packed = convert(q)
        fq = lowbit.fake_quant(q.weight, q.weight_quant.step.abs(), bits, signed=True, axis=0)
        assert torch.equal(packed.dequantized_weight(), fq.reshape(7, -1))


# ---------------------------------------------------------------------------------------------------------------
# convert: options, reports, bad input
# ---------------------------------------------------------------------------------------------------------------


def _multi_branch_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    lowbit.quantize(model, 4, 4, multi_branch=(2, 4, 8))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    return model.eval()


def test_convert_multi_branch_policy():
    model = _multi_branch_model()
    assert isinstance(model[2], MultiBranchQConv2d)
    with pytest.raises(ValueError, match=r"layer '2' is multi-branch.*multi_branch='selected'"):
        convert(model)
    packed = convert(model, multi_branch="selected")
    single = copy.deepcopy(model)
    single[2] = single[2].to_single_branch()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        _close(packed(x), single(x), rel=1e-4)
    assert packed[2].a_bits == model[2].selected_bits()


def test_convert_inplace_and_report_lists_float_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))
    lowbit.quantize(model, 4, 8, skip=["2"])
    model(torch.randn(2, 3, 8, 8))
    same, report = convert(model, inplace=True, return_report=True)
    assert same is model and isinstance(model[0], PackedConv2d) and isinstance(model[4], PackedLinear)
    assert isinstance(report, ConvertReport)
    assert [name for name, _, _ in report.kept] == ["2"]
    text = str(report)
    assert "converted 2 layer(s)" in text and "kept 1 float layer(s)" in text


def test_convert_minmax_ptq_layers_stay_float():
    """MinMaxPTQ's asymmetric weights sit in plain float layers: nothing to pack, said clearly."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    MinMaxPTQ().apply(model, {"0": 4, "2": 4})
    with pytest.raises(ValueError, match="MinMaxPTQ"):
        convert(model)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: convert("model"), TypeError, "model must be a torch.nn.Module"),
        (lambda: convert(nn.Linear(3, 4)), ValueError, "no QConv2d/QLinear"),
        (lambda: convert(QLinear(3, 4)), ValueError, "uninitialised"),
        (lambda: convert(_calibrated("small_cnn")[0], inplace=1), TypeError, "inplace must be a bool"),
        (lambda: convert(_calibrated("small_cnn")[0], multi_branch="mix"), ValueError, "multi_branch must be"),
        (lambda: convert(_calibrated("small_cnn")[0], return_report="y"), TypeError, "return_report"),
        (lambda: convert(convert(_calibrated("small_cnn")[0])), ValueError, "already converted"),
        (lambda: PackedConv2d(4, 6, 3, groups=4, w_bits=4, a_bits=8), ValueError, "groups must divide"),
        (lambda: PackedConv2d(4, 6, 3, w_bits=9, a_bits=8), ValueError, "w_bits must be in 2..8"),
        (lambda: PackedConv2d(4, 6, 3, w_bits=4, a_bits=None), ValueError, "a_bits must be an int"),
        (lambda: DequantLinear(4, 6, w_bits=4, a_bits=8), ValueError, "a_bits / a_signed must be left out"),
        (lambda: DequantConv2d(4, 6, 3, w_bits=4, a_signed=True), ValueError, "a_signed=True"),
        (lambda: PackedLinear(4, 0, w_bits=4, a_bits=8), ValueError, "out_features must be >= 1"),
        (lambda: PackedConv2d(4, 6, 3, w_bits=4, a_bits=8, padding_mode="mirror"), ValueError, "padding_mode"),
        (lambda: PackedConv2d(4, 6, 3, w_bits=4, a_bits=8)(torch.rand(1, 3, 5, 5)), ValueError, "x must have shape"),
        (lambda: PackedLinear(4, 2, w_bits=4, a_bits=8)(torch.rand(1, 3)), ValueError, r"x must have shape"),
        (lambda: DequantLinear(4, 2, w_bits=4)(torch.ones(1, 4, dtype=torch.int32)), TypeError, "x must be float"),
    ],
)
def test_convert_and_layers_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_resnet():
    model, x = _calibrated("resnet18", first_float=True)
    return convert(model), x


def test_save_load_is_bit_exact(packed_resnet, tmp_path):
    model, x = packed_resnet
    path = tmp_path / "resnet.safetensors"
    save(model, path)
    loaded = load(path)
    assert type(loaded) is type(model) and not loaded.training
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(expected) == list(got)
    for key in expected:
        assert expected[key].dtype == got[key].dtype and torch.equal(expected[key], got[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert os.listdir(tmp_path) == ["resnet.safetensors"], "no temporary file may stay behind"


def test_save_load_user_model_needs_a_skeleton(tmp_path):
    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2))

    model = build()
    lowbit.quantize(model, 3, 5)
    model(torch.randn(2, 3, 5, 5))
    packed = convert(model.eval())
    path = tmp_path / "user.safetensors"
    save(packed, path)
    with pytest.raises(ValueError, match="pass model="):
        load(path)
    x = torch.randn(2, 3, 5, 5)
    for skeleton in (build, build(), copy.deepcopy(model)):  # a builder, the float model, the fake-quant model
        with torch.no_grad():
            assert torch.equal(load(path, model=skeleton)(x), packed(x))
    with pytest.raises(ValueError, match="does not fit the model"):
        load(path, model=nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.ReLU(), nn.Flatten(), nn.Linear(36, 2)))
    with pytest.raises(ValueError, match="packed layer '4' that the model does not have"):
        load(path, model=nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_w4_weights_take_an_eighth_of_fp32(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, in_channels=3, width_mult=0.25, small_input=True)
    lowbit.quantize(model, 4, 8, first_last_bits=None)
    model(torch.randn(2, 3, 8, 8))
    packed = convert(model.eval())
    layers = [m for m in packed.modules() if hasattr(m, "packed_weight")]
    stored = sum(m.packed_weight.numel() * m.packed_weight.element_size() for m in layers)
    ratio = stored / sum(weight_bytes(m.float_weight_shape()) for m in layers)
    assert 0.125 <= ratio < 0.127, ratio  # 1/8 plus the odd-K padding of the 3-channel stem
    path = tmp_path / "w4.safetensors"
    save(packed, path)
    fp32_bytes = float_parameter_bytes(model)
    assert os.path.getsize(path) < 0.25 * fp32_bytes  # steps, BN and the JSON header on top of the codes


def test_a_version_1_file_loads_and_gives_the_logits_it_gave():
    """tests/data/packed_v1_small_cnn.safetensors: format version 1 (x_bits, x_signed, w_scale, x_step), written by
    the lowbit before version 2 (tests/data/make_packed_v1.py); read under the new names, the logits it recorded.
    Those were recorded on one CPU; the float head's arithmetic rounds differently on others (an Intel AVX-512
    machine differed in one logit by 6e-11, 8e-5 relative), so the logits are compared at float32 rounding
    scale, far below what a wrong translation (a step or scale misread) changes."""
    data = pathlib.Path(__file__).parent / "data"
    expected = json.loads((data / "packed_v1_small_cnn.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the translation uses no deprecated path
        model = load(data / "packed_v1_small_cnn.safetensors")
    x = torch.randn(
        *expected["input"]["shape"], generator=torch.Generator().manual_seed(expected["input"]["generator_seed"])
    )
    with torch.no_grad():
        want = torch.tensor(expected["logits"])
        torch.testing.assert_close(model(x), want, rtol=2e-4, atol=1e-6 * float(want.abs().max()))
    first, head = model.features[0][0], model.classifier
    assert (type(first), first.w_bits, first.a_bits, first.a_signed) == (PackedConv2d, 8, 8, True)
    assert type(head) is DequantLinear and head.a_bits is None and "a_step" not in head.state_dict()
    assert {"packed_weight", "w_step", "a_step"} <= set(first.state_dict())


def test_save_writes_version_2_under_the_training_names(small_file):
    from safetensors import safe_open

    path, _ = small_file
    with safe_open(str(path), "pt") as f:
        metadata, keys = f.metadata(), set(f.keys())
    configs = json.loads(metadata["layers"]).values()
    assert metadata["format_version"] == "2"
    assert all({"a_bits", "a_signed"} <= set(c) and not {"x_bits", "x_signed"} & set(c) for c in configs)
    assert "classifier.w_step" in keys and "classifier.a_step" in keys
    assert not any(k.endswith((".w_scale", ".x_step")) for k in keys)


def test_old_names_still_work_and_warn():
    with pytest.warns(DeprecationWarning) as warned:
        layer = PackedLinear(4, 3, w_bits=4, x_bits=6, x_signed=True)
    assert [str(w.message) for w in warned] == [
        "PackedLinear: x_bits= is deprecated, use a_bits=",
        "PackedLinear: x_signed= is deprecated, use a_signed=",
    ]
    assert all(w.filename == __file__ for w in warned)  # the warning points at the caller
    assert (layer.a_bits, layer.a_signed) == (6, True)
    with pytest.warns(DeprecationWarning, match=r"PackedLinear.x_step is deprecated, use .a_step"):
        assert layer.x_step is layer.a_step
    with pytest.warns(DeprecationWarning, match=r"w_scale is deprecated, use .w_step"):
        assert layer.w_scale is layer.w_step
    with pytest.warns(DeprecationWarning, match="x_bits"):
        assert layer.x_bits == 6
    codes = torch.randint(-8, 8, (3, 4), dtype=torch.int8)
    with pytest.warns(DeprecationWarning) as warned:
        layer.set_weight(codes, w_scale=torch.full((3,), 0.5), x_step=torch.tensor([0.25]))
    assert [str(w.message).split(": ")[1] for w in warned] == ["w_scale= is deprecated, use w_step=",
                                                                "x_step= is deprecated, use a_step="]  # fmt: skip
    assert all(w.filename == __file__ for w in warned)
    assert torch.equal(layer.w_step, torch.full((3,), 0.5)) and float(layer.a_step) == 0.25
    with pytest.raises(TypeError, match="both 'a_bits' and its deprecated name 'x_bits'"):
        PackedLinear(4, 3, w_bits=4, a_bits=6, x_bits=6)
    with pytest.raises(TypeError, match="unexpected keyword argument 'y_bits'"):
        PackedConv2d(4, 3, 1, w_bits=4, a_bits=6, y_bits=6)
    with pytest.raises(ValueError, match="codes outside the signed 2-bit range"):
        PackedLinear(4, 3, w_bits=2, a_bits=8).set_weight(codes.clamp(-8, -3), torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------
# faults: every damaged file is a ValueError that says what is wrong, never a model
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=3, in_channels=1, width=4)
    lowbit.quantize(model, 4, 8)
    model(torch.randn(2, 1, 8, 8))
    packed = convert(model.eval())
    path = tmp_path_factory.mktemp("faults") / "small.safetensors"
    save(packed, path)
    return path, path.read_bytes()


def _header_size(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _write(tmp_path, data: bytes):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(data)
    return path


def test_truncated_file_is_rejected(small_file, tmp_path):
    _, data = small_file
    header = _header_size(data)
    for size in (0, 5, 8, 9, header // 2, header - 1, header, header + 1, (header + len(data)) // 2, len(data) - 1):
        with pytest.raises(ValueError, match="truncated|corrupted|not a lowbit file"):
            load(_write(tmp_path, data[:size]))
    with pytest.raises(ValueError, match="truncated|corrupted"):
        load(_write(tmp_path, data + b"\0" * 8))  # bytes appended


def test_every_flipped_bit_is_rejected(small_file, tmp_path):
    """One bit flipped at ~600 positions spread over the length field, the JSON header with its metadata
    (format, version, arch, layer configs, checksum) and the tensor data: each load fails with ValueError."""
    _, data = small_file
    header = _header_size(data)
    metadata_start = data.index(b'"__metadata__"')
    positions = set(range(0, 16)) | set(range(16, header, max(1, header // 400)))
    positions |= set(range(metadata_start, min(header, metadata_start + 200)))
    positions |= set(range(header, len(data), max(1, (len(data) - header) // 150))) | {len(data) - 1}
    for pos in sorted(positions):
        damaged = bytearray(data)
        damaged[pos] ^= 1 << (pos % 8)
        with pytest.raises(ValueError) as info:
            load(_write(tmp_path, bytes(damaged)))
        assert str(info.value), pos
    assert len(positions) > 500


def _rewrite(data: bytes, change) -> bytes:
    """The file with its metadata changed by ``change(metadata)`` (tensors as they were)."""
    from safetensors.torch import load as from_bytes
    from safetensors.torch import save as to_bytes

    header = json.loads(data[8 : _header_size(data)])
    metadata = dict(header["__metadata__"])
    change(metadata)
    return to_bytes(from_bytes(data), metadata=metadata)


def test_tampered_metadata_fails_the_checksum(small_file, tmp_path):
    _, data = small_file

    def more_bits(metadata):
        layers = json.loads(metadata["layers"])
        layers["classifier"]["a_bits"] = 4
        metadata["layers"] = json.dumps(layers)

    with pytest.raises(ValueError, match="failed its checksum"):
        load(_write(tmp_path, _rewrite(data, more_bits)))


def test_wrong_version_format_and_missing_metadata(small_file, tmp_path):
    _, data = small_file

    def resign(**changes):
        def change(metadata):
            metadata.update(changes)
            tensors = __import__("safetensors.torch").torch.load(data)
            metadata["checksum"] = checksum(tensors, metadata)

        return _rewrite(data, change)

    with pytest.raises(ValueError, match="format version '3'; this lowbit reads versions 1, 2"):
        load(_write(tmp_path, resign(format_version="3")))
    with pytest.raises(ValueError, match="format 'gguf'"):
        load(_write(tmp_path, resign(format="gguf")))
    with pytest.raises(ValueError, match=r"lacks \['layers'\]"):
        load(_write(tmp_path, _rewrite(data, lambda m: m.pop("layers"))))
    with pytest.raises(ValueError, match="lacks 'format_version'"):
        load(_write(tmp_path, _rewrite(data, lambda m: m.pop("format_version"))))
    from safetensors.torch import save as to_bytes

    with pytest.raises(ValueError, match="no lowbit metadata"):
        load(_write(tmp_path, to_bytes({"w": torch.ones(2)})))


def test_consistent_but_impossible_codes_are_rejected(tmp_path):
    """A 3-bit layer's 4-bit container holding -8 (a valid checksum, e.g. a buggy writer): not a model."""
    packed = convert(_q_layer(nn.Linear(4, 2), torch.randn(3, 4), 3, 8, True))
    packed.packed_weight.fill_(0x88)  # codes -8
    path = tmp_path / "bad_codes.safetensors"
    save(packed, path)
    with pytest.raises(ValueError, match="outside the signed 3-bit range"):
        load(path, model=nn.Linear(4, 2))


def test_save_is_atomic(small_file, tmp_path, monkeypatch):
    path, data = small_file
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old contents")
    model = load(path)

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        save(model, target)
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["model.safetensors"]
    monkeypatch.undo()
    save(model, target)
    assert target.read_bytes() == data


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda p: save("model", p / "m.safetensors"), TypeError, "model must be a torch.nn.Module"),
        (lambda p: save(nn.Linear(2, 2), 123), TypeError, "path must be a str or os.PathLike"),
        (lambda p: save(nn.Linear(2, 2), p), ValueError, "path must be a file, got the directory"),
        (lambda p: save(nn.Linear(2, 2), p / "no" / "m.safetensors"), ValueError, "folder .* does not exist"),
        (lambda p: save(_calibrated("small_cnn")[0], p / "m.safetensors"), ValueError, "call lowbit.convert"),
        (lambda p: load(p), ValueError, "path must be a file, got the directory"),
        (lambda p: load(None), TypeError, "path must be a str"),
        (lambda p: load(p / "missing.safetensors"), FileNotFoundError, "does not exist"),
    ],
)
def test_save_and_load_reject_bad_input(tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_load_rejects_a_bad_model_argument(small_file):
    path, _ = small_file
    with pytest.raises(TypeError, match="model must be an nn.Module or a callable"):
        load(path, model=lambda: 5)


def test_file_is_plain_safetensors(small_file):
    """Any safetensors reader opens the file: the packed codes are ordinary uint8 tensors."""
    from safetensors import safe_open

    path, _ = small_file
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["format"] == "lowbit.packed"
        assert f.get_tensor("classifier.packed_weight").dtype == torch.uint8
