"""``lowbit demo --quick`` end to end (the README's main job, shrunk): every artefact is written, the report agrees
with metrics.json, the packed model's accuracy equals the fake-quant model's, and the PNGs are real images."""

from __future__ import annotations

import json
import re

import pytest

from lowbit import cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out


def test_every_artefact_is_written(demo_out):
    for name in ("report.md", "metrics.json", "pareto.png", "bits.png", "model.safetensors"):
        assert (demo_out / name).stat().st_size > 0, name


def test_pngs_are_valid_images(demo_out):
    import matplotlib.image

    for name in ("pareto.png", "bits.png"):
        assert (demo_out / name).read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(demo_out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image.std() > 0  # not a blank canvas


def test_packed_accuracy_equals_fake_quant(demo_out):
    deploy = json.loads((demo_out / "metrics.json").read_text())["deploy"]
    assert deploy["packed_acc"] == deploy["fake_quant_acc"]
    assert deploy["accuracy_equal"] is True
    assert deploy["file_bytes"] < deploy["fp32_bytes"]


def test_report_numbers_agree_with_metrics(demo_out):
    metrics = json.loads((demo_out / "metrics.json").read_text())
    report = (demo_out / "report.md").read_text()
    names = [r["name"] for r in metrics["results"]]
    assert {"fp32", "uniform W4A4", "uniform W4A2", "MixQuant W + A4", "MixQuant + MetaMix"} <= set(names)
    for r in metrics["results"]:
        row = re.search(rf"^\| {re.escape(r['name'])} \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
        assert row is not None, r["name"]
        assert float(row.group(1)) == pytest.approx(r["acc"], abs=0.005)
        assert float(row.group(2)) == pytest.approx(r["bops"] / 1e6, abs=0.05)
    assert f"{metrics['deploy']['packed_acc']:.2f}" in report
    plan = metrics["mixquant"]["plan"]
    for layer, bits in plan.items():
        assert re.search(rf"^\| {re.escape(layer)} \| {bits} \|", report, re.M), layer


def test_metamix_meets_its_bops_target(demo_out):
    metamix = json.loads((demo_out / "metrics.json").read_text())["metamix"]
    assert metamix["bops"] <= metamix["target_bops"] * (1 + 1e-9)


def test_bad_flags_give_one_line_errors(capsys):
    assert cli.main(["demo", "--quick", "--target-bits", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target_bits" in err[0]
    assert cli.main(["eval", "/nonexistent/model.safetensors"]) == 2
    assert "no such file" in capsys.readouterr().err
