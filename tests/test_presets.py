"""The paper-scale presets (lowbit/app/presets.py): each one is a valid setting of its command, runs end to end through
the CLI a user runs (sizes overridden to a tiny generated image folder), loses to any option written on the command
line, and an unknown name is a one-line error naming the known ones. The ImageNet transforms they use (no
torchvision) are checked against what they promise, and one preset runs under torchrun with two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lowbit.app import cli, data, presets
from lowbit.metamix import MetaMixConfig
from lowbit.models import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METAMIX = [p.name for p in presets.PRESETS.values() if p.command == "metamix"]
MIXQUANT = [p.name for p in presets.PRESETS.values() if p.command == "mixquant"]
# 5 images a class: 1 tests, 4 train; batches of 3 leave no BatchNorm batch of one image. 64x64 inputs keep a 2x2
# map after the standard stem's stride 32: at 32x32 (1x1, 3 values a channel) MobileNet-v2 training diverged to NaN
TINY_SIZES = ["--image-size", "64", "--width", "0.25", "--batch-size", "3", "--workers", "0", "--no-progress"]
TINY_METAMIX = ["--fp-epochs", "1", "--search-epochs", "1", "--finetune-epochs", "1"]
TINY_MIXQUANT = ["--epochs", "1", "--brecq-iters", "2", "--brecq-samples", "6", "--brecq-batch-size", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 5 RGB images of 40x48 (PNG and JPEG), each class a different brightness."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet_like")
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / f"class{c}")
        for i in range(5):
            pixels = (rng.random((40, 48, 3)) * 60 + 70 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.{'png' if i % 2 else 'jpg'}")
    return str(root)


# ------------------------------------------------------------------------------------------------- the presets


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_every_preset_is_a_valid_setting_of_its_command(name):
    preset = presets.PRESETS[name]
    parser = cli.build_parser()
    dests = {a.dest for a in parser.commands[preset.command]._actions}
    assert set(preset.options) <= dests, set(preset.options) - dests
    args = cli.parse_args([preset.command, "--preset", name, "--data", "x"])
    assert {k: getattr(args, k) for k in preset.options} == preset.options
    assert (args.image_size, args.stem, args.transforms) == (224, "standard", "imagenet")
    assert args.model in ("mobilenet_v2", "mobilenet_v3_small", "resnet18") and args.width == 1.0
    if preset.command == "metamix":
        config = cli.metamix_config(args)
        assert (config.w_bits, config.first_last_bits, config.a_bits) == (4, 8, (2, 4, 8))
    else:
        assert (args.avg_bits, args.quantizer) == (4.0, "brecq")
    assert preset.reproduces.startswith("arXiv ")


@pytest.mark.parametrize("model", ["mobilenet_v2", "mobilenet_v3_small", "resnet18"])
def test_the_standard_stem_takes_224_images_to_1000_classes(model):
    net = create_model(model, num_classes=1000, small_input=False).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name", METAMIX)
def test_each_metamix_preset_runs_a_few_steps(name, folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["metamix", "--preset", name, "--data", folder, *TINY_SIZES, *TINY_METAMIX, "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["w_bits"] == 4 and report["config"]["a_bits"] == [2, 4, 8]
    assert report["config"]["lr"] == presets.PRESETS[name].options["qat_lr"]
    assert report["config"]["target_bits"] == 4.0 and report["bops"] <= report["target_bops"]
    assert set(report["bits"].values()) <= {2, 4, 8}
    assert (out / "qat.safetensors").is_file()


@pytest.mark.parametrize("name", MIXQUANT)
def test_each_mixquant_preset_runs_a_few_steps(name, folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["mixquant", "--preset", name, "--data", folder, *TINY_SIZES, *TINY_MIXQUANT, "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["avg_bits"] <= 4.0 + 1e-9 and set(plan["plan"].values()) <= set(range(2, 9))
    assert "+ brecq" in capsys.readouterr().out


def test_options_on_the_command_line_beat_the_preset():
    name = "imagenet-resnet18-metamix"
    argv = ["metamix", "--preset", name, "--data", "x", "--search-epochs", "3", "--model", "mobilenet_v2"]
    args = cli.parse_args(argv + ["--image-size", "64", "--a-bits-choices", "2,4", "--stem", "small"])
    assert (args.search_epochs, args.model, args.image_size, args.a_bits_choices, args.stem) == (
        3,
        "mobilenet_v2",
        64,
        [2, 4],
        "small",
    )
    assert args.finetune_epochs == presets.PRESETS[name].options["finetune_epochs"]  # not given: the preset's
    assert cli.parse_args(["metamix", "--data", "x"]).search_epochs == MetaMixConfig(target_bits=3).search_epochs


@pytest.mark.parametrize("command, name", [("metamix", "imagenet-resnet50-metamix"), ("mixquant", METAMIX[0])])
def test_an_unknown_preset_is_one_line_naming_the_known_ones(command, name, capsys):
    assert cli.main([command, "--preset", name, "--data", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0]
    known = METAMIX if command == "metamix" else MIXQUANT
    assert all(k in err[0] for k in known)


def test_a_preset_without_a_float_model_says_what_to_give(folder, tmp_path, capsys):
    argv = ["metamix", "--preset", METAMIX[0], "--data", folder, "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "--fp-epochs" in err


def test_a_preset_needs_an_image_folder(tmp_path, capsys):
    argv = ["mixquant", "--preset", MIXQUANT[0], "--epochs", "1", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "--data FOLDER" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["presets"], ["metamix", "--preset", "list"]])
def test_the_presets_are_listed(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in presets.PRESETS) and "torchrun" in out


# ------------------------------------------------------------------------------------------ ImageNet transforms


def _image(width=48, height=40):
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_train_transform_is_a_random_crop_of_the_asked_size():
    transform = data.imagenet_train_transform(24)
    torch.manual_seed(0)
    first = transform(_image())
    second = transform(_image())
    assert first.shape == second.shape == (3, 24, 24) and first.dtype == torch.float32
    assert not torch.equal(first, second)  # a new crop (and flip) each time
    crop = data.RandomResizedCrop(24)
    for _ in range(50):
        left, top, right, bottom = crop.box(48, 40)
        area = (right - left) * (bottom - top)
        assert 0 <= left < right <= 48 and 0 <= top < bottom <= 40 and area >= 0.08 * 48 * 40 - 48 - 40


def test_test_transform_is_resize_then_center_crop_normalised():
    img = _image(64, 32)
    out = data.imagenet_test_transform(28)(img)  # shorter side 32 -> 32 (28 / 0.875), then the center 28x28
    assert out.shape == (3, 28, 28)
    expected = np.asarray(img, dtype=np.float32)[2:30, 18:46] / 255.0  # resize is the identity at 64x32
    mean, std = np.array(data.IMAGENET_MEAN), np.array(data.IMAGENET_STD)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), (expected - mean) / std, atol=1e-5)


def test_imagenet_layout_uses_train_and_val(tmp_path, folder):
    for part in ("train", "val"):
        os.symlink(folder, tmp_path / part)
    stream = data.imagenet_folder(str(tmp_path), image_size=16)
    assert len(stream.train) == len(stream.test) == 15 and stream.num_classes == 3
    train, test = stream.loaders(batch_size=4)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    assert sum(len(b[1]) for b in train) == 12  # the last partial training batch is dropped
    assert sum(len(b[1]) for b in test) == 15


def test_split_folder_keeps_classes_apart(folder):
    stream = data.imagenet_folder(folder, image_size=16)
    assert len(stream.train) == 12 and len(stream.test) == 3
    assert not set(stream.train.files) & set(stream.test.files)
    assert sorted(stream.test.labels) == [0, 1, 2]


def test_calibration_is_unaugmented_and_mixes_classes(folder):
    stream = data.imagenet_folder(folder, image_size=16)
    first = next(iter(stream.calibration_loader(batch_size=6, seed=0)))
    again = next(iter(stream.calibration_loader(batch_size=6, seed=0)))
    assert torch.equal(first[0], again[0])  # the test transform: the same pixels each time
    assert len(set(first[1].tolist())) > 1  # shuffled: not the first class's files only


@pytest.mark.parametrize(
    "kwargs, word", [(dict(image_size=0), "image_size"), (dict(workers=-1), "workers"), (dict(root="/nope"), "folder")]
)
def test_imagenet_folder_bad_input(folder, kwargs, word):
    kwargs = {"root": folder, **kwargs}
    with pytest.raises(ValueError, match=word):
        data.imagenet_folder(**kwargs)


# ------------------------------------------------------------------------------------------------ torchrun


def test_a_preset_runs_under_torchrun_with_two_processes(folder, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lowbit.app.cli"]
    argv = ["metamix", "--preset", "imagenet-resnet18-metamix", "--data", folder, *TINY_SIZES, *TINY_METAMIX]
    done = subprocess.run(cmd + argv + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone writes the model and the report
    report = json.loads((out / "report.json").read_text())
    assert report["bops"] <= report["target_bops"]
    epochs = len((out / "log.jsonl").read_text().splitlines())
    assert epochs == 3  # one record per epoch (fp, search, finetune), written once
