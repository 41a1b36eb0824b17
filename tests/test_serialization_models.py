"""Float and fake-quant models (``lowbit.save_model`` / ``load_model``, format ``lowbit.model``) and training
checkpoints (``state_bytes`` / ``read_state``, format ``lowbit.checkpoint``): safetensors + JSON, no pickle.

Round trips are exact (outputs bit for bit, every tensor and quantizer state equal); damaged or inconsistent
files are ValueErrors; a pickled file is read only with ``allow_pickle=True``; a pickled MetaMix checkpoint of an
older lowbit, migrated, resumes exactly as the uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import lowbit
import lowbit.app.data
from lowbit.metamix import MetaMix, checkpoint
from lowbit.models import create_model
from lowbit.nn import MultiBranchQConv2d
from lowbit.tools import serialization

X = torch.rand(4, 1, 8, 8)


def _small(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn", num_classes=10, in_channels=1, width=8, **kwargs)


def _calibrated(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        model(X)
    return model.eval()


def _mobilenet_multi_branch() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, in_channels=1, small_input=True, width_mult=0.25)
    return _calibrated(lowbit.quantize(model, 4, multi_branch=(2, 4, 8)))


def _selected_single_branch() -> nn.Module:
    """What MetaMix returns: multi-branch layers turned into single-branch LSQ layers at chosen bits."""
    model = _mobilenet_multi_branch()
    for name, layer in list(model.named_modules()):
        if isinstance(layer, MultiBranchQConv2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to_single_branch(2 if len(name) % 2 else 4))
    return model.eval()


MODELS = {
    "float": lambda: _small().eval(),
    "w4a4": lambda: _calibrated(lowbit.quantize(_small(), w_bits=4, a_bits=4)),
    "mixquant-plan-weight-only": lambda: _calibrated(
        lowbit.quantize(_small(), w_bits=4, a_bits=8, bits={"features.1.0": 3, "features.3.0": 2})
    ),
    "uncalibrated": lambda: lowbit.quantize(_small(), w_bits=3, a_bits=5).eval(),
    "multi-branch": _mobilenet_multi_branch,
    "metamix-selected": _selected_single_branch,
    "resnet18-w2a3": lambda: _calibrated(
        lowbit.quantize(
            create_model("resnet18", num_classes=10, in_channels=1, small_input=True, width_mult=0.25), 2, 3
        )
    ),
}


def _equal_states(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
        else:
            assert sa[key] == sb[key], key
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_exact(name, tmp_path):
    model = MODELS[name]()
    path = tmp_path / "m.safetensors"
    lowbit.save_model(model, path)
    loaded = lowbit.load_model(path)
    _equal_states(model, loaded)
    assert not loaded.training and loaded.lowbit_arch == model.lowbit_arch
    if name != "uncalibrated":  # an uncalibrated model would initialise its steps from this batch
        with torch.no_grad():
            assert torch.equal(model(X), loaded(X))
    assert serialization.file_format(path) == "lowbit.model"
    lowbit.save_model(loaded, tmp_path / "again.safetensors")  # the same model gives the same bytes
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_converting_a_loaded_model_equals_converting_the_original(tmp_path):
    model = MODELS["w4a4"]()
    lowbit.save_model(model, tmp_path / "qat.safetensors")
    a, b = lowbit.convert(model), lowbit.convert(lowbit.load_model(tmp_path / "qat.safetensors"))
    with torch.no_grad():
        assert torch.equal(a(X), b(X))


def test_any_safetensors_reader_opens_it_and_the_metadata_is_json(tmp_path):
    lowbit.save_model(MODELS["multi-branch"](), tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        metadata = f.metadata()
        assert all(f.get_tensor(k).numel() >= 1 for k in f.keys())
    assert metadata["format"] == "lowbit.model" and metadata["format_version"] == "1"
    arch, layers, extra = (json.loads(metadata[k]) for k in ("arch", "layers", "extra_state"))
    assert arch["name"] == "mobilenet_v2" and arch["kwargs"]["width_mult"] == 0.25
    assert {c["type"] for c in layers.values()} == {"QConv2d", "QLinear", "MultiBranchQConv2d"}
    assert all(set(v) == {"bits", "signed", "initialized"} for v in extra.values())


def test_a_model_without_recorded_architecture_needs_model_argument(tmp_path):
    model = _calibrated(lowbit.quantize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))))
    lowbit.save_model(model, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="pass model="):
        lowbit.load_model(tmp_path / "m.safetensors")
    skeleton = lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))  # noqa: E731
    loaded = lowbit.load_model(tmp_path / "m.safetensors", model=skeleton)
    _equal_states(model, loaded)


# ------------------------------------------------------------------------------------------------ damaged files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "qat.safetensors"
    lowbit.save_model(MODELS["w4a4"](), path)
    return path


def _load_bytes(tmp_path, data: bytes):
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(data)
    return lowbit.load_model(path)


def test_every_bit_flip_truncation_and_extension_is_a_value_error(saved, tmp_path):
    data = saved.read_bytes()
    header = int.from_bytes(data[:8], "little") + 8
    positions = sorted({*range(0, 8), *range(8, header, max(1, header // 150)), *range(header, len(data), 97)})
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 1 << (position % 8)
        with pytest.raises(ValueError):
            _load_bytes(tmp_path, bytes(damaged))
    for length in [0, 4, 8, 9, header - 1, header, header + 1, len(data) // 2, len(data) - 1]:
        with pytest.raises(ValueError):
            _load_bytes(tmp_path, data[:length])
    with pytest.raises(ValueError):
        _load_bytes(tmp_path, data + b"\0")
    assert len(positions) > 200


def _resigned(saved, tmp_path, change) -> str:
    """A consistent file (checksum recomputed) with ``change(metadata)`` applied: wrong content, not damage."""
    with safe_open(str(saved), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(metadata)
    metadata["checksum"] = serialization.checksum(tensors, metadata)
    from safetensors.torch import save_file

    path = str(tmp_path / "resigned.safetensors")
    save_file(tensors, path, metadata=metadata)
    return path


def _set_json(key, edit):
    def change(metadata):
        value = json.loads(metadata[key])
        edit(value)
        metadata[key] = json.dumps(value)

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_set_json("arch", lambda a: a.update(name="vgg")), "'vgg' cannot be built"),
        (_set_json("arch", lambda a: a["kwargs"].update(depth=3)), "cannot be built"),
        (_set_json("layers", lambda ls: ls.update({"nope": ls["classifier"]})), "'nope' that the model does not have"),
        (_set_json("layers", lambda ls: ls["classifier"].update(type="Conv9d")), "fake-quant layer type"),
        (_set_json("layers", lambda ls: ls["classifier"].update(in_features=7)), "the model expects"),
        (_set_json("layers", lambda ls: ls.pop("classifier")), "does not fit the model"),
        (_set_json("extra_state", lambda e: e["classifier.act_quant._extra_state"].update(bits=99)), "invalid state"),
        (_set_json("extra_state", lambda e: e.pop("classifier.act_quant._extra_state")), "does not fit the model"),
        (lambda m: m.update(extra_state="{"), "not valid JSON"),
        (lambda m: m.update(format="lowbit.packed"), "expected 'lowbit.model'"),
        (lambda m: m.update(format_version="2"), "reads version 1 only"),
        (lambda m: m.pop("layers"), r"lacks \['layers'\]"),
    ],
)
def test_consistent_but_wrong_metadata_is_refused(saved, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        lowbit.load_model(_resigned(saved, tmp_path, change))


def test_formats_are_not_mixed_up(saved, tmp_path):
    packed = tmp_path / "packed.safetensors"
    lowbit.save(lowbit.convert(lowbit.load_model(saved)), packed)
    with pytest.raises(ValueError, match="lowbit.load_model reads it"):
        lowbit.load(saved)
    with pytest.raises(ValueError, match="lowbit.load reads it"):
        lowbit.load_model(packed)
    with pytest.raises(ValueError, match="training checkpoint, not a model"):
        (tmp_path / "c.safetensors").write_bytes(serialization.state_bytes({"a": 1}))
        lowbit.load_model(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="expected 'lowbit.checkpoint'"):
        serialization.read_state(saved)


def test_save_model_refuses_what_it_could_not_rebuild(tmp_path):
    model = _small()
    model.features[1] = nn.Sequential(model.features[1], nn.Dropout())
    with pytest.raises(
        ValueError, match="cannot be rebuilt .*'features.1.0' is Sequential in the model, Conv2d when rebuilt"
    ):
        lowbit.save_model(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------------------------------------ pickle files


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_torch_load_reads_tensors_only_unless_allowed(tmp_path):
    marker = str(tmp_path / "payload-ran")
    torch.save({"weights": torch.ones(2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        serialization.torch_load(tmp_path / "evil.pt")
    assert not os.path.exists(marker)
    serialization.torch_load(tmp_path / "evil.pt", allow_pickle=True)
    assert os.path.exists(marker)  # what the opt-in risks
    torch.save({"w": torch.arange(3)}, tmp_path / "state.pt")
    assert torch.equal(serialization.torch_load(tmp_path / "state.pt")["w"], torch.arange(3))
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match="not a readable PyTorch file"):
        serialization.torch_load(tmp_path / "broken.pt")
    assert serialization.file_format(tmp_path / "evil.pt") == serialization.PICKLE


# ------------------------------------------------------------------------------------------------ checkpoints


def _training_state() -> dict:
    model = MODELS["multi-branch"]().train()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam([p for n, p in model.named_parameters() if "alpha" in n], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, T_max=3)
    for _ in range(2):
        model(X).square().mean().backward()
        sgd.step(), adam.step(), sched.step()
    generator = torch.Generator().manual_seed(5)
    torch.rand(3, generator=generator)
    return {
        "version": 1,
        "model": model.state_dict(),
        "w_opt": sgd.state_dict(),
        "a_opt": adam.state_dict(),
        "sched": sched.state_dict(),
        "rng": [checkpoint.rng_state([generator])],
        "records": [{"phase": "search", "loss": math.nan, "acc": 91.25, "best": math.inf}],
        "nested": {"tuple": (1, (2.5, None), "s"), 3: "int key", (1, 2): [True, False]},
        "numpy_scalar": np.float32(0.25),
        "selection": None,
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b and (type(a) is type(b) or isinstance(a, np.generic))


def test_checkpoint_state_round_trips_exactly(tmp_path):
    state = _training_state()
    checkpoint.save(str(tmp_path), state)
    assert serialization.file_format(checkpoint.checkpoint_path(str(tmp_path))) == "lowbit.checkpoint"
    loaded = checkpoint.load(str(tmp_path))
    assert _same(state, loaded)
    assert type(loaded["numpy_scalar"]) is float  # a NumPy scalar comes back as the Python number
    model = MODELS["multi-branch"]()
    model.load_state_dict(loaded["model"])  # what the trainer does with it
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict(loaded["w_opt"])


def test_rng_states_restore_every_generator(tmp_path):
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # a cached Gaussian in NumPy's state
    checkpoint.save(str(tmp_path), {"rng": checkpoint.rng_state([generator])})
    expected = (
        torch.rand(4),
        np.random.rand(3),
        np.random.normal(),
        random.random(),
        torch.rand(2, generator=generator),
    )
    torch.manual_seed(9), np.random.seed(9), random.seed(9), generator.manual_seed(9)
    checkpoint.set_rng_state(checkpoint.load(str(tmp_path))["rng"], [generator])
    got = (torch.rand(4), np.random.rand(3), np.random.normal(), random.random(), torch.rand(2, generator=generator))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:4] == expected[2:4] and torch.equal(got[4], expected[4])


def test_a_damaged_checkpoint_is_a_value_error(tmp_path):
    checkpoint.save(str(tmp_path), _training_state())
    path = checkpoint.checkpoint_path(str(tmp_path))
    data = open(path, "rb").read()
    for cut in (len(data) // 3, len(data) - 1):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(ValueError, match="truncated|corrupted"):
            checkpoint.load(str(tmp_path))


def test_pickled_checkpoint_migrates_and_resumes_as_the_uninterrupted_run(tmp_path):
    """A checkpoint written by the pickle-era lowbit (torch.save, RNG tuples) is refused, migrated with the
    opt-in, and the resumed run ends where the uninterrupted one does."""
    from test_metamix import config, loaders, state_of, tiny_net

    digits = lowbit.app.data.digits()  # what test_metamix's data fixture holds
    data = digits.train_x[:192], digits.train_y[:192], digits.test_x[:64], digits.test_y[:64]
    train, test = loaders(data)
    ref_model, ref = MetaMix(tiny_net(), train, test, config(checkpoint_dir=str(tmp_path / "a"))).fit()

    folder = str(tmp_path / "b")
    train, test = loaders(data)
    assert MetaMix(tiny_net(), train, test, config(checkpoint_dir=folder)).fit(stop_after=2) is None
    state = checkpoint.load(folder)
    for rng in state["rng"]:  # back to the old form: NumPy and Python states as tuples
        n, p = rng["numpy"], rng["python"]
        rng["numpy"] = (n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                        n["cached_gaussian"])  # fmt: skip
        rng["python"] = (p["version"], tuple(p["internal"].tolist()), p["gauss_next"])
    torch.save(state, os.path.join(folder, checkpoint.LEGACY_CHECKPOINT))
    os.remove(checkpoint.checkpoint_path(folder))

    train, test = loaders(data)
    resumed = MetaMix(tiny_net(), train, test, config(checkpoint_dir=folder, resume=True))
    with pytest.raises(ValueError, match="allow_pickle=True"):
        resumed.fit()
    assert checkpoint.migrate(folder, allow_pickle=True) is True
    assert checkpoint.migrate(folder, allow_pickle=True) is False  # done once
    train, test = loaders(data)
    model, report = MetaMix(tiny_net(), train, test, config(checkpoint_dir=folder, resume=True)).fit()
    assert report.bits == ref.bits
    a, b = state_of(ref_model), state_of(model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["test_acc"] for r in report.history] == [r["test_acc"] for r in ref.history]
