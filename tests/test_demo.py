"""``lowbit demo --quick`` end to end (the README's main job, shrunk): every artefact is written, the report agrees
with metrics.json, the packed model's accuracy equals the fake-quant model's, and the PNGs are real images."""

from __future__ import annotations

import json
import re

import pytest

from lowbit.app import cli

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
    uniform = {f"uniform W4A{b}" for b in (2, 3, 4, 8)}
    assert {"fp32", "MixQuant W + A4", "MetaMix W4", "MixQuant + MetaMix", *uniform} <= set(names)
    for r in metrics["results"]:
        row = re.search(rf"^\| {re.escape(r['name'])} \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
        assert row is not None, r["name"]
        assert float(row.group(1)) == pytest.approx(r["acc"], abs=0.005)
        assert float(row.group(2)) == pytest.approx(r["bops"] / 1e6, abs=0.05)
    assert f"{metrics['deploy']['packed_acc']:.2f}" in report
    plan = metrics["mixquant"]["plan"]
    for layer, bits in plan.items():
        assert re.search(rf"^\| {re.escape(layer)} \| {bits} \|", report, re.M), layer


def test_frontier_gaps_are_computed_from_the_uniform_points(demo_out):
    metrics = json.loads((demo_out / "metrics.json").read_text())
    report = (demo_out / "report.md").read_text()
    by_name = {r["name"]: r for r in metrics["results"]}
    points = sorted((r["bops"], r["acc"]) for n, r in by_name.items() if n.startswith("uniform W4A"))
    assert len(points) == 4
    assert set(metrics["frontier"]) == {"MixQuant W + A4", "MetaMix W4", "MixQuant + MetaMix"}
    for name, score in metrics["frontier"].items():
        r = by_name[name]
        if not points[0][0] <= r["bops"] <= points[-1][0]:
            assert score["gap"] is None and f"{name}: " in report and "outside" in report
            continue
        (c0, a0), (c1, a1) = next((p, q) for p, q in zip(points, points[1:], strict=False) if p[0] <= r["bops"] <= q[0])
        expected = a0 + (a1 - a0) * (r["bops"] - c0) / (c1 - c0)
        assert score["frontier_acc"] == pytest.approx(expected) and score["gap"] == pytest.approx(r["acc"] - expected)
        side = "above" if score["gap"] > 0 else "under" if score["gap"] < 0 else "on"
        assert (
            f"{name}: {r['acc']:.2f}%" in report and f"{side} the frontier by {abs(score['gap']):.2f} points" in report
        )
        row = re.search(rf"^\| {re.escape(name)} \|.*\| ([+-][\d.]+) \|$", report, re.M)
        assert row is not None and float(row.group(1)) == pytest.approx(score["gap"], abs=0.005)


def test_metamix_meets_its_bops_target(demo_out):
    metamix = json.loads((demo_out / "metrics.json").read_text())["metamix"]
    assert metamix["bops"] <= metamix["target_bops"] * (1 + 1e-9)


def test_bad_flags_give_one_line_errors(capsys):
    assert cli.main(["demo", "--quick", "--target-bits", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target_bits" in err[0]
    assert cli.main(["eval", "/nonexistent/model.safetensors"]) == 2
    assert "no such file" in capsys.readouterr().err
