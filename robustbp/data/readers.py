"""Readers for the on-disk formats of the papers' datasets; nothing is ever downloaded.

- IDX (MNIST, Fashion-MNIST, KMNIST): `read_idx`, gzipped or not.
- CIFAR-10 / CIFAR-100 "python version" pickle batches: `read_cifar`.
- SVHN cropped digits (`train_32x32.mat`, `test_32x32.mat`): `read_svhn`.

Every reader checks what it reads and raises `DataError` with the file's path on anything
unexpected (bad magic, truncated data, missing keys).
"""
from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from .imageset import ImageSet

DATA_ENV = "ROBUSTBP_DATA"
HOW_TO_POINT = f"point to the folder with --data-dir or the {DATA_ENV} environment variable (nothing is downloaded)"


class DataError(ValueError):
    """A dataset could not be found, read or understood; the message says which file and why."""


# --------------------------------------------------------------------------------------- IDX
# IDX (LeCun's MNIST format): two zero bytes, a type code, the number of dimensions, then one
# big-endian int32 per dimension, then the data in big-endian order.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the file starts with the gzip magic (whatever its name)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: corrupt gzip data ({err})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its shape and native dtype.

    Handles the type codes 0x08 (uint8), 0x09 (int8), 0x0B (int16), 0x0C (int32),
    0x0D (float32), 0x0E (float64). Bad magic or a wrong length raise `DataError`.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'}; expected 0000 + type code "
            f"{'/'.join(f'{code:02x}' for code in _IDX_DTYPES)} + number of dimensions)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX data of shape {shape} needs {expected} bytes, the file holds {len(raw) - header}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def find_file(folder: Path, name: str) -> Path | None:
    """`folder/name` or `folder/name.gz`, whichever exists (the plain one first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _images_from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) 0..255 → float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32).div_(255.0)


def _labels(array, num_classes: int, path: Path) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(array).astype(np.int64).reshape(-1))
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"{path}: labels must lie in [0, {num_classes}), found {int(labels.min())}..{int(labels.max())}")
    return labels


def read_idx_split(folder: str | Path, prefix: str, num_classes: int = 10, name: str = "") -> ImageSet:
    """`{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]` (prefix "train" or "t10k").

    Images uint8 (N, H, W) → float32 (N, 1, H, W) in [0, 1]; labels → int64 (N,).
    """
    folder = Path(folder)
    paths = {}
    for kind, base in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
        paths[kind] = find_file(folder, base)
        if paths[kind] is None:
            raise DataError(f"{folder}: missing {base} (or {base}.gz); {HOW_TO_POINT}")
    images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{paths['images']}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{paths['labels']}: expected {len(images)} labels (one per image), got shape {labels.shape}")
    return ImageSet(_images_from_uint8(images[:, None]), _labels(labels, num_classes, paths["labels"]), num_classes, name)


# ------------------------------------------------------------------------------------- CIFAR
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR100_FILES = ("train", "test")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numpy arrays only: a CIFAR batch cannot run code on load."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch: b'data' uint8 (N, 3072) as R, G, B planes of 32×32 → (N, 3, 32, 32)."""
    try:
        batch = _ArraysOnlyUnpickler(io.BytesIO(_read_bytes(path)), encoding="bytes").load()
    except DataError:
        raise
    except Exception as err:  # pickle raises many kinds of errors on corrupt input
        raise DataError(f"{path}: not a CIFAR pickle batch ({type(err).__name__}: {err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with keys b'data' and {label_key!r}, got {keys}")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{path}: expected uint8 data (N, 3072) and N labels, got {data.dtype} {data.shape}, {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar(folder: str | Path, coarse: bool = False) -> tuple[ImageSet, ImageSet]:
    """CIFAR-10 or CIFAR-100 "python version" batches in `folder` → (train, test).

    CIFAR-10: data_batch_1..5 (train, 50,000) and test_batch (10,000), key b'labels', 10 classes.
    CIFAR-100: train (50,000) and test (10,000), key b'fine_labels' (100 classes) or, with
    `coarse=True`, b'coarse_labels' (20 superclasses). Images float32 (N, 3, 32, 32) in [0, 1].
    """
    folder = Path(folder)
    if all((folder / f).is_file() for f in CIFAR10_FILES):
        if coarse:
            raise DataError(f"{folder}: coarse labels exist only for CIFAR-100, this folder holds CIFAR-10")
        name, num_classes, label_key = "cifar10", 10, b"labels"
        splits = {"train": CIFAR10_FILES[:5], "test": CIFAR10_FILES[5:]}
    elif all((folder / f).is_file() for f in CIFAR100_FILES):
        name, num_classes, label_key = ("cifar100", 20, b"coarse_labels") if coarse else ("cifar100", 100, b"fine_labels")
        splits = {"train": ("train",), "test": ("test",)}
    else:
        raise DataError(
            f"{folder}: no CIFAR batches; expected {', '.join(CIFAR10_FILES)} (CIFAR-10) "
            f"or {', '.join(CIFAR100_FILES)} (CIFAR-100); {HOW_TO_POINT}"
        )
    result = []
    for files in splits.values():
        parts = [_read_cifar_batch(folder / f, label_key) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        result.append(ImageSet(_images_from_uint8(images), _labels(labels, num_classes, folder / files[0]), num_classes, name))
    return result[0], result[1]


# -------------------------------------------------------------------------------------- SVHN
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _read_svhn_mat(path: Path) -> ImageSet:
    """X uint8 (32, 32, 3, N) → (N, 3, 32, 32) in [0, 1]; y (N, 1) with 10 meaning the digit 0."""
    import scipy.io

    if not path.is_file():
        raise DataError(f"{path}: no such file; {HOW_TO_POINT}")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises ValueError, NotImplementedError (v7.3 files), ...
        raise DataError(f"{path}: not a readable SVHN .mat file ({type(err).__name__}: {err})") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables X and y, found {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DataError(f"{path}: expected X of shape (32, 32, 3, N) with N = len(y) = {len(y)}, got {x.shape}")
    y = np.where(y == 10, 0, y)
    return ImageSet(_images_from_uint8(x.astype(np.uint8).transpose(3, 2, 0, 1)), _labels(y, 10, path), 10, "svhn")


def read_svhn(folder: str | Path) -> tuple[ImageSet, ImageSet]:
    """SVHN cropped digits: `train_32x32.mat` (73,257) and `test_32x32.mat` (26,032) → (train, test).

    `extra_32x32.mat` is not read. Images float32 (N, 3, 32, 32) in [0, 1]; label 10 → digit 0.
    """
    folder = Path(folder)
    train, test = (_read_svhn_mat(folder / f) for f in SVHN_FILES)
    return train, test
