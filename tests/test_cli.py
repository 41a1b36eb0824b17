"""The ``lowbit`` subcommands a user runs on their own model and data: mixquant and metamix train and write a
fake-quant model, convert packs it, eval scores both the same; every --help is complete; the defaults are the
library's; files are safetensors (no pickle unless --allow-pickle); every bad input is one line naming the file.

``CLI_CASES`` is the CLI's bad-input table; docs/reliability.md lists its ids (tests/test_bad_input_api.py checks)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import pickle
import re
import sys

import pytest
import torch

import lowbit
from lowbit.app import cli
from lowbit.app.demo import DemoConfig
from lowbit.metamix import MetaMixConfig
from lowbit.mixquant import LSQFineTune
from lowbit.models import create_model
from lowbit.tools import serialization

TINY = ["--model", "small_cnn", "--epochs", "1", "--no-progress"]


def _top1(capsys) -> float:
    return float(re.search(r"top-1 ([\d.]+)%", capsys.readouterr().out).group(1))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling (torch.load, pickle.load/loads) fails the test: proves a command reads no pickle."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(target, name, refuse)


def _written_formats(folder: pathlib.Path) -> dict[str, str]:
    """The format of every model or checkpoint file under ``folder``."""
    found = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".safetensors", ".pt", ".pth", ".pkl"):
            found[str(path.relative_to(folder))] = serialization.file_format(path)
    return found


def test_metamix_convert_eval(tmp_path, capsys, no_unpickling):
    out = tmp_path / "mm"
    assert cli.main(["metamix", *TINY, "--search-epochs", "1", "--finetune-epochs", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bops"] <= report["target_bops"] * (1 + 1e-9)
    for name in ("qat.safetensors", "fp32.safetensors", "bits.png", "trajectories.png", "log.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert _written_formats(out) == {
        "qat.safetensors": "lowbit.model",
        "fp32.safetensors": "lowbit.model",
        os.path.join("checkpoints", "metamix.safetensors"): "lowbit.checkpoint",
    }
    capsys.readouterr()
    assert cli.main(["convert", str(out / "qat.safetensors"), str(out / "model.safetensors")]) == 0
    assert cli.main(["eval", str(out / "qat.safetensors")]) == 0
    fake_quant = _top1(capsys)
    assert cli.main(["eval", str(out / "model.safetensors")]) == 0
    assert _top1(capsys) == fake_quant


def test_metamix_resume_from_its_checkpoint(tmp_path, capsys, no_unpickling):
    """--resume after a finished run reads the safetensors checkpoint and the saved float model (no training:
    every epoch is done) and reports what the run reported."""
    out = tmp_path / "mm"
    args = ["metamix", *TINY, "--search-epochs", "1", "--finetune-epochs", "1", "--out", str(out)]
    assert cli.main(args) == 0
    first = json.loads((out / "report.json").read_text())
    assert cli.main([*args, "--resume"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["bits"] == first["bits"] and again["history"] == first["history"]


def test_demo_writes_and_eval_reads_no_pickle(tmp_path, capsys, no_unpickling):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    formats = _written_formats(out)
    assert formats and set(formats.values()) <= {"lowbit.packed", "lowbit.model", "lowbit.checkpoint"}, formats
    capsys.readouterr()
    assert cli.main(["eval", str(out / "model.safetensors")]) == 0
    _top1(capsys)  # eval printed its result line (the demo's own reload check compares accuracies)


def test_mixquant_lsq_from_a_checkpoint(tmp_path, capsys, no_unpickling):
    first = tmp_path / "first"
    assert cli.main(["mixquant", *TINY, "--finetune-epochs", "1", "--out", str(first)]) == 0
    assert serialization.file_format(first / "qat.safetensors") == "lowbit.model"
    second = tmp_path / "second"
    args = ["mixquant", "--model", "small_cnn", "--checkpoint", str(first / "fp32.safetensors"), "--no-progress"]
    assert cli.main([*args, "--quantizer", "minmax", "--avg-bits", "2.5", "--out", str(second)]) == 0
    plan = json.loads((second / "plan.json").read_text())
    assert plan["avg_bits"] <= 2.5 and set(plan["plan"].values()) <= set(range(2, 9))
    assert not (second / "fp32.safetensors").exists()  # the float model came from the checkpoint
    assert cli.main(["convert", str(second / "qat.safetensors"), str(second / "m.safetensors")]) == 2  # no QConv2d


def test_checkpoint_may_be_a_state_dict_pt(tmp_path, capsys):
    """A state_dict saved with torch.save is read with weights_only=True (tensors only): no opt-in needed."""
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    torch.save(model.state_dict(), tmp_path / "fp32.pt")
    out = tmp_path / "out"
    argv = ["mixquant", *TINY, "--checkpoint", str(tmp_path / "fp32.pt"), "--quantizer", "minmax", "--out", str(out)]
    assert cli.main(argv) == 0
    loaded = lowbit.load_model(out / "qat.safetensors")
    assert loaded.lowbit_arch == model.lowbit_arch


def _legacy_qat(path: pathlib.Path) -> torch.nn.Module:
    """A fake-quant model pickled whole, as lowbit mixquant/metamix wrote qat.pt before."""
    model = lowbit.quantize(create_model("small_cnn", num_classes=10, in_channels=1), w_bits=4, a_bits=4)
    model(torch.rand(2, 1, 8, 8))
    torch.save(model, path)
    return model


def test_pickled_model_needs_allow_pickle(tmp_path, capsys):
    _legacy_qat(tmp_path / "qat.pt")
    out = str(tmp_path / "m.safetensors")
    assert cli.main(["convert", str(tmp_path / "qat.pt"), out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--allow-pickle" in err[0] and str(tmp_path / "qat.pt") in err[0]
    assert not os.path.exists(out)
    assert cli.main(["convert", str(tmp_path / "qat.pt"), out, "--allow-pickle"]) == 0
    assert serialization.file_format(out) == "lowbit.packed"


class _Payload:
    """Unpickling this object creates a file: what a malicious .pt could do instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("command", ["convert", "eval"])
def test_a_pickle_payload_does_not_run(command, tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"model": _Payload(str(marker))}, tmp_path / "evil.pt")
    argv = [command, str(tmp_path / "evil.pt")] + ([str(tmp_path / "m.safetensors")] if command == "convert" else [])
    assert cli.main(argv) == 2
    assert not marker.exists()
    assert "--allow-pickle" in capsys.readouterr().err
    assert cli.main([*argv, "--allow-pickle"]) == 2  # the opt-in does what it says it risks: the payload runs
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- defaults


def _library_defaults() -> dict[tuple[str, str], object]:
    """(command, argparse dest) -> the library's default, written out here independently of cli.py."""
    mm = {f.name: f.default for f in dataclasses.fields(MetaMixConfig)}
    demo = DemoConfig()
    import inspect

    ft = {n: p.default for n, p in inspect.signature(LSQFineTune).parameters.items()}
    shared = {
        "model": demo.model,
        "width": demo.width,
        "seed": demo.seed,
        "image_size": demo.image_size,
        "device": demo.device,
        "data": demo.data,
    }
    training = {**shared, "epochs": demo.epochs, "lr": demo.lr, "batch_size": demo.batch_size}
    table = {("demo", k): v for k, v in shared.items()}
    table.update({("demo", k): getattr(demo, k) for k in ("epochs", "qat_epochs", "target_bits", "weight_bits")})
    table.update({("mixquant", k): v for k, v in training.items()})
    table.update({("metamix", k): v for k, v in training.items()})
    table.update({("eval", k): shared[k] for k in ("image_size", "device", "data")})
    table.update(
        {
            ("mixquant", "avg_bits"): demo.weight_bits,
            ("mixquant", "finetune_epochs"): ft["epochs"],
            ("mixquant", "a_bits"): ft["a_bits"],
            ("metamix", "target_bits"): demo.target_bits,  # MetaMixConfig has none: a budget must be given
            ("metamix", "a_bits_choices"): list(mm["a_bits"]),
            ("metamix", "w_bits"): mm["w_bits"],
            ("metamix", "search_epochs"): mm["search_epochs"],
            ("metamix", "finetune_epochs"): mm["finetune_epochs"],
            ("metamix", "lam"): mm["lam"],
            ("metamix", "mode"): mm["mode"],
            ("metamix", "seed"): mm["seed"],
            ("metamix", "device"): mm["device"],
        }
    )
    return table


@pytest.mark.parametrize("command", ["demo", "mixquant", "metamix", "eval"])
def test_defaults_are_the_library_defaults(command, capsys):
    """Every flag with a library counterpart defaults to the library's value, and --help says that value."""
    expected = {dest: v for (cmd, dest), v in _library_defaults().items() if cmd == command}
    positional = ["x.safetensors"] if command == "eval" else []
    args = vars(cli.build_parser().parse_args([command, *positional]))
    got = {dest: args[dest] for dest in expected}
    assert got == expected
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for dest, value in expected.items():
        if value is not None and dest not in ("data",):
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            assert f"(default {shown}" in text or f"default {shown}" in text, (dest, shown)


def test_metamix_lam_default_is_the_library_one():
    """The issue's example: --lam was 1.0 while MetaMixConfig.lam is 10."""
    args = cli.build_parser().parse_args(["metamix"])
    assert args.lam == MetaMixConfig.__dataclass_fields__["lam"].default


@pytest.mark.parametrize("command", ["info", "demo", "bench", "mixquant", "metamix", "convert", "eval"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert f"usage: lowbit {command}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- bad input


def _rewrite_metadata(path: pathlib.Path, target: pathlib.Path, change) -> None:
    """A copy of a lowbit file with ``change(metadata)`` applied and the checksum recomputed (a consistent file
    with wrong content, not a corrupted one)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(metadata)
    metadata["checksum"] = serialization.checksum(tensors, metadata)
    from safetensors.torch import save_file

    save_file(tensors, str(target), metadata=metadata)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """One file of every kind the CLI may be handed, good and bad."""
    root = tmp_path_factory.mktemp("files")
    qat = lowbit.quantize(create_model("small_cnn", num_classes=10, in_channels=1), w_bits=4, a_bits=4)
    qat(torch.rand(2, 1, 8, 8))
    lowbit.save_model(qat, root / "qat.safetensors")
    lowbit.save_model(create_model("small_cnn", num_classes=10, in_channels=1), root / "fp32.safetensors")
    lowbit.save(lowbit.convert(qat), root / "packed.safetensors")
    (root / "ckpt.safetensors").write_bytes(serialization.state_bytes({"epoch": 1, "w": torch.ones(3)}))
    data = (root / "qat.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    (root / "flipped.safetensors").write_bytes(bytes(flipped))
    _rewrite_metadata(
        root / "qat.safetensors",
        root / "wrong-arch.safetensors",
        lambda m: m.update(arch=json.dumps({"builder": "lowbit.models.create_model", "name": "vgg", "kwargs": {}})),
    )
    _rewrite_metadata(
        root / "qat.safetensors",
        root / "wrong-kwargs.safetensors",
        lambda m: m.update(arch=m["arch"].replace('"in_channels": 1', '"in_channels": 1, "width": 4')),
    )
    _legacy_qat(root / "qat.pt")
    torch.save(qat.state_dict(), root / "state_dict.pt")
    (root / "hostname").write_text("my-machine\n")
    (root / "empty").write_bytes(b"")
    (root / "folder").mkdir()
    legacy_run = root / "legacy-run"
    (legacy_run / "checkpoints").mkdir(parents=True)
    (legacy_run / "checkpoints" / "metamix.pt").write_bytes(b"\x80\x04 a pickled checkpoint of an older lowbit")
    return {p.name: str(p) for p in root.iterdir()} | {"root": str(root)}


# (id, argv with {file} placeholders, what the one line must say besides naming the file)
CLI_CASES = [
    ("cli-convert-missing", ["convert", "{root}/nope.safetensors", "{out}"], "no such file"),
    ("cli-convert-folder", ["convert", "{folder}", "{out}"], "directory"),
    ("cli-convert-text-file", ["convert", "{hostname}", "{out}"], "not a lowbit file"),
    ("cli-convert-empty-file", ["convert", "{empty}", "{out}"], "0 bytes"),
    ("cli-convert-truncated", ["convert", "{truncated.safetensors}", "{out}"], "truncated"),
    ("cli-convert-bit-flip", ["convert", "{flipped.safetensors}", "{out}"], "checksum"),
    ("cli-convert-unknown-arch", ["convert", "{wrong-arch.safetensors}", "{out}"], "'vgg' cannot be built"),
    ("cli-convert-arch-mismatch", ["convert", "{wrong-kwargs.safetensors}", "{out}"], "the model expects"),
    ("cli-convert-pickle", ["convert", "{qat.pt}", "{out}"], "--allow-pickle"),
    ("cli-convert-state-dict", ["convert", "{state_dict.pt}", "{out}"], "not a model"),
    ("cli-convert-checkpoint", ["convert", "{ckpt.safetensors}", "{out}"], "checkpoint, not a model"),
    ("cli-convert-packed", ["convert", "{packed.safetensors}", "{out}"], "already converted"),
    (
        "cli-convert-output-folder-missing",
        ["convert", "{qat.safetensors}", "{root}/no/m.safetensors"],
        "does not exist",
    ),
    ("cli-convert-output-is-folder", ["convert", "{qat.safetensors}", "{folder}"], "is a folder"),
    ("cli-eval-text-file", ["eval", "{hostname}"], "not a lowbit file"),
    ("cli-eval-pickle", ["eval", "{qat.pt}"], "--allow-pickle"),
    ("cli-eval-checkpoint", ["eval", "{ckpt.safetensors}"], "checkpoint, not a model"),
    ("cli-eval-data-missing", ["eval", "{qat.safetensors}", "--data", "{root}/no-images"], "not a folder"),
    (
        "cli-checkpoint-missing",
        ["metamix", *TINY, "--checkpoint", "{root}/nope.pt", "--out", "{root}/o"],
        "no such file",
    ),
    (
        "cli-checkpoint-text-file",
        ["mixquant", *TINY, "--checkpoint", "{hostname}", "--out", "{root}/o"],
        "not a lowbit",
    ),
    (
        "cli-checkpoint-other-model",
        ["mixquant", "--model", "resnet18", "--checkpoint", "{fp32.safetensors}", "--out", "{root}/o"],
        "model is a resnet18",
    ),
    (
        "cli-checkpoint-quantized",
        ["mixquant", *TINY, "--checkpoint", "{qat.safetensors}", "--out", "{root}/o"],
        "quantized",
    ),
    ("cli-checkpoint-pickle", ["metamix", *TINY, "--checkpoint", "{qat.pt}", "--out", "{root}/o"], "allow_pickle"),
    ("cli-resume-pickled-checkpoint", ["metamix", *TINY, "--resume", "--out", "{legacy-run}"], "--allow-pickle"),
    ("cli-out-is-a-file", ["metamix", *TINY, "--out", "{hostname}"], "expected a folder"),
    ("cli-mixquant-qem", ["mixquant", *TINY, "--qem", "0.5", "--out", "{root}/o"], "--qem"),
    ("cli-metamix-target-bits", ["metamix", *TINY, "--target-bits", "1", "--out", "{root}/o"], "target_bits"),
]
NAMED_FILE = re.compile(r"\{([^}]+)\}")


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_naming_the_file(argv, expected, files, tmp_path, capsys):
    names = {**files, "out": str(tmp_path / "m.safetensors")}
    named = [NAMED_FILE.sub(lambda m: names[m.group(1)], a) for a in argv if NAMED_FILE.search(a)]
    named = [a for a in named if not a.endswith(os.sep + "o")]  # an --out folder is not what the message is about
    argv = [NAMED_FILE.sub(lambda m: names[m.group(1)], a) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert expected in err[0] and "Traceback" not in err[0]
    if expected not in ("--qem", "target_bits"):  # the flag cases have no file to name
        assert any(path in err[0] for path in named), (named, err[0])
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------------------------------------- bench


@pytest.fixture
def fake_bench(tmp_path, monkeypatch):
    """A bench/ folder in the current folder whose scripts record, in ``common.CALLS``, the argv their ``main`` was
    called with; returns a function that writes script ``name`` with body ``body``. sys.path and sys.modules are
    restored afterwards (the fake ``common`` must not shadow the real one in later tests)."""
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "common.py").write_text("CALLS = []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = dict(sys.modules)
    sys.modules.pop("common", None)

    def script(name: str, body: str) -> None:
        record = f"    common.CALLS.append(({name!r}, argv))\n"
        (folder / f"{name}.py").write_text(f"import common\n\n\ndef main(argv=None):\n{record}{body}\n")

    yield script
    for name in set(sys.modules) - set(before):
        del sys.modules[name]
    sys.modules.update(before)


def test_bench_calls_each_benchmark_in_this_process(fake_bench, monkeypatch, capsys):
    from lowbit.app import benchmarks

    fake_bench("one", "    return 0")
    fake_bench("two", "    return 0")
    monkeypatch.setattr(benchmarks, "BENCHMARKS", {"cpu": [("one",), ("two", "--device", "cpu")]})
    assert cli.main(["bench", "--quick"]) == 0
    assert sys.modules["common"].CALLS == [("one", ["--quick"]), ("two", ["--device", "cpu", "--quick"])]


def test_a_failing_benchmark_fails_the_run_after_the_others(fake_bench, monkeypatch, capsys):
    from lowbit.app import benchmarks

    fake_bench("bad", "    raise RuntimeError('kernel exploded')")
    fake_bench("exits", "    raise SystemExit(3)")
    fake_bench("good", "    return 0")
    monkeypatch.setattr(benchmarks, "BENCHMARKS", {"cpu": [("bad",), ("exits",), ("good",)]})
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "RuntimeError: kernel exploded" in err  # the benchmark's own traceback
    assert err.strip().splitlines()[-1] == "lowbit bench: error: benchmarks failed: bad, exits (see their output above)"
    assert [name for name, _ in sys.modules["common"].CALLS] == ["bad", "exits", "good"]


def test_bench_without_a_checkout_is_one_line(tmp_path, monkeypatch, capsys):
    from lowbit.app import benchmarks

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(benchmarks, "CHECKOUT_BENCH", str(tmp_path / "site-packages" / "bench"))
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not installed with lowbit" in err[0] and "source checkout" in err[0]


def test_bench_device_must_be_known(capsys):
    assert cli.main(["bench", "--device", "tpu"]) == 2
    assert "--device must be one of cpu, cuda, got 'tpu'" in capsys.readouterr().err


def test_the_cli_lists_only_existing_benchmarks():
    from lowbit.app import benchmarks

    folder = benchmarks.CHECKOUT_BENCH  # this checkout's
    for scripts in benchmarks.BENCHMARKS.values():
        for name, *_ in scripts:
            assert os.path.isfile(os.path.join(folder, f"{name}.py")), name
