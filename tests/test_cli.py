"""The ``lowbit`` subcommands a user runs on their own model and data: mixquant and metamix train and write a
fake-quant model, convert packs it, eval scores both the same; every --help is complete; mistakes are one line."""

from __future__ import annotations

import json
import re

import pytest

from lowbit import cli

TINY = ["--model", "small_cnn", "--epochs", "1", "--no-progress"]


def _top1(capsys) -> float:
    return float(re.search(r"top-1 ([\d.]+)%", capsys.readouterr().out).group(1))


def test_metamix_convert_eval(tmp_path, capsys):
    out = tmp_path / "mm"
    assert cli.main(["metamix", *TINY, "--search-epochs", "1", "--finetune-epochs", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bops"] <= report["target_bops"] * (1 + 1e-9)
    for name in ("qat.pt", "fp32.pt", "bits.png", "trajectories.png", "log.jsonl"):
        assert (out / name).stat().st_size > 0, name
    capsys.readouterr()
    assert cli.main(["convert", str(out / "qat.pt"), str(out / "model.safetensors")]) == 0
    assert cli.main(["eval", str(out / "qat.pt")]) == 0
    fake_quant = _top1(capsys)
    assert cli.main(["eval", str(out / "model.safetensors")]) == 0
    assert _top1(capsys) == fake_quant


def test_mixquant_lsq_from_a_checkpoint(tmp_path, capsys):
    first = tmp_path / "first"
    assert cli.main(["mixquant", *TINY, "--finetune-epochs", "1", "--out", str(first)]) == 0
    second = tmp_path / "second"
    args = ["mixquant", "--model", "small_cnn", "--checkpoint", str(first / "fp32.pt"), "--no-progress"]
    assert cli.main([*args, "--quantizer", "minmax", "--avg-bits", "2.5", "--out", str(second)]) == 0
    plan = json.loads((second / "plan.json").read_text())
    assert plan["avg_bits"] <= 2.5 and set(plan["plan"].values()) <= set(range(2, 9))
    assert not (second / "fp32.pt").exists()  # the float model came from the checkpoint


@pytest.mark.parametrize("command", ["info", "demo", "bench", "mixquant", "metamix", "convert", "eval"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert f"usage: lowbit {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["convert", "/no/such.pt", "/tmp/x.safetensors"], "no such file"),
        (["mixquant", *TINY, "--qem", "0.5", "--out", "OUT"], "--qem"),
        (["metamix", *TINY, "--target-bits", "1", "--out", "OUT"], "target_bits"),
        (["metamix", *TINY, "--checkpoint", "/no/such.pt", "--out", "OUT"], "--checkpoint"),
        (["eval", "/no/such.safetensors"], "no such file"),
    ],
)
def test_user_mistakes_are_one_line(argv, expected, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "Traceback" not in err[0]
