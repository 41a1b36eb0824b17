"""Data for the examples, the demo and the method studies.

``digits`` is the embedded default: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no
download), split once with a fixed seed so every run and every method sees the same train and test sets.
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


def load(data: str | None = None, image_size: int = 32, channels: int = 3) -> Dataset:
    """``digits`` when ``data`` is None or ``"digits"``, else the image folder at ``data``."""
    if data is None or data == "digits":
        return digits()
    return image_folder(data, image_size=image_size, channels=channels)
