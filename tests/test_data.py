"""robustbp.data: readers on small files in the real formats, the registry, subsets, splits, Augment.

The files are written here with plain struct/pickle/scipy, independently of the readers.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from robustbp import data
from robustbp.data import Augment, DataError, ImageSet

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------ file writers
def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype], array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def write_idx_dataset(folder: Path, rng: np.random.Generator, n_train=30, n_test=20, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar_batch(path: Path, data_u8: np.ndarray, labels: dict[bytes, list[int]]):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"test", b"data": data_u8, **labels}, f, protocol=2)


# ---------------------------------------------------------------------------------- read_idx
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    path = write_idx(tmp_path / "a-idx3", array, compress)
    result = data.read_idx(path)
    assert result.dtype == np.dtype(dtype) and result.shape == (2, 3, 4)
    np.testing.assert_array_equal(result, array)


def test_read_idx_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">i", 3) + b"abc")
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(bad)
    unknown_type = tmp_path / "type"
    unknown_type.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">i", 3) + b"abc")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(unknown_type)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x02" + struct.pack(">ii", 3, 3) + b"abc")
    with pytest.raises(DataError, match="needs 9 bytes"):
        data.read_idx(short)
    corrupt_gz = tmp_path / "x.gz"
    corrupt_gz.write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(DataError, match="gzip"):
        data.read_idx(corrupt_gz)
    with pytest.raises(DataError, match="no such file"):
        data.read_idx(tmp_path / "missing")


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_dataset_from_data_dir(tmp_path, compress):
    arrays = write_idx_dataset(tmp_path / "mnist", np.random.default_rng(0), compress=compress)
    train, test = data.load("mnist", data_dir=tmp_path)  # root; the "mnist" subfolder is found
    assert train.images.shape == (30, 1, 28, 28) and test.images.shape == (20, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.num_classes == 10 and train.name == test.name == "mnist"
    images, labels = arrays["t10k"]
    np.testing.assert_array_equal(test.images[:, 0].numpy(), images.astype(np.float32) / 255)
    np.testing.assert_array_equal(test.labels.numpy(), labels)


def test_load_uses_env_var(tmp_path, monkeypatch):
    arrays = write_idx_dataset(tmp_path / "KMNIST" / "raw", np.random.default_rng(1))
    monkeypatch.setenv("ROBUSTBP_DATA", str(tmp_path))
    train, _ = data.load("kmnist")
    np.testing.assert_array_equal(train.images[:, 0].numpy() * 255, arrays["train"][0].astype(np.float32))


def test_missing_files_message(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUSTBP_DATA", raising=False)
    with pytest.raises(DataError) as err:
        data.load("kmnist", data_dir=tmp_path / "nowhere")
    message = str(err.value)
    for needed in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", str(tmp_path / "nowhere"),
                   "does not exist", "--data-dir", "ROBUSTBP_DATA"):
        assert needed in message
    with pytest.raises(DataError, match="data_batch_1.*cifar-10-batches-py"):
        data.load("cifar10", data_dir=tmp_path)


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="unknown dataset 'nope'.*fashion-mnist.*mnist-5k"):
        data.load("nope")
    assert isinstance(DataError("x"), ValueError)
    assert {"fashion-mnist", "mnist-5k", "digits", "mnist", "kmnist", "cifar10", "cifar100", "svhn"} <= set(data.available())


def test_corrupt_idx_label_count(tmp_path):
    folder = tmp_path / "fashion-mnist"
    write_idx_dataset(folder, np.random.default_rng(2))
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(7, np.uint8), compress=True)
    with pytest.raises(DataError, match="expected 30 labels"):
        data.load("fashion-mnist", data_dir=folder)


# ------------------------------------------------------------------------------------- CIFAR
def test_read_cifar10_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=4).tolist()
        write_cifar_batch(tmp_path / name, raw, {b"labels": labels})
        batches[name] = (raw, labels)
    train, test = data.read_cifar(tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.num_classes == 10
    raw, labels = batches["data_batch_2"]
    # row layout: 1024 red, 1024 green, 1024 blue values, each a 32×32 image in row-major order
    np.testing.assert_array_equal(train.images[4:8].numpy(), raw.reshape(4, 3, 32, 32).astype(np.float32) / 255)
    assert train.labels[4:8].tolist() == labels
    assert float(train.images[5, 1, 2, 3]) == raw[1, 1024 + 2 * 32 + 3] / np.float32(255)
    train2, _ = data.load("cifar10", data_dir=tmp_path)
    assert torch.equal(train2.images, train.images) and train2.name == "cifar10"


def test_read_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(4)
    for name, n in (("train", 6), ("test", 3)):
        write_cifar_batch(tmp_path / name, rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                          {b"fine_labels": [99, 0, 5, 17, 42, 63][:n], b"coarse_labels": [19, 0, 1, 2, 3, 4][:n]})
    train, test = data.read_cifar(tmp_path)
    assert train.num_classes == 100 and train.labels.tolist() == [99, 0, 5, 17, 42, 63] and len(test) == 3
    coarse_train, _ = data.read_cifar(tmp_path, coarse=True)
    assert coarse_train.num_classes == 20 and coarse_train.labels.tolist() == [19, 0, 1, 2, 3, 4]


def test_read_cifar_batch_pickled_by_numpy_1(tmp_path):
    """The real batches name numpy.core.multiarray (numpy 1), not numpy._core (numpy 2)."""
    raw = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072) % 251
    for name, n in (("train", 2), ("test", 2)):
        blob = pickle.dumps({b"data": raw[:n], b"fine_labels": [3, 7]}, protocol=2)
        (tmp_path / name).write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    train, _ = data.read_cifar(tmp_path)
    assert train.labels.tolist() == [3, 7]
    np.testing.assert_array_equal(train.images.numpy() * 255, raw.reshape(2, 3, 32, 32).astype(np.float32))


def test_read_cifar_refuses_code_and_bad_files(tmp_path):
    for name in ("train", "test"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"evil": print}, f)
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        data.read_cifar(tmp_path)
    (tmp_path / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a CIFAR pickle batch"):
        data.read_cifar(tmp_path)


# -------------------------------------------------------------------------------------- SVHN
def test_read_svhn_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    written = {}
    for name, n in (("train_32x32.mat", 5), ("test_32x32.mat", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [9], [10], [4]][:n], dtype=np.uint8)
        scipy.io.savemat(tmp_path / name, {"X": x, "y": y})
        written[name] = (x, y)
    train, test = data.read_svhn(tmp_path)
    x, _ = written["train_32x32.mat"]
    assert train.images.shape == (5, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.labels.tolist() == [0, 1, 9, 0, 4]  # label 10 is the digit 0
    np.testing.assert_array_equal(train.images.numpy(), x.transpose(3, 2, 0, 1).astype(np.float32) / 255)
    assert float(train.images[2, 1, 7, 11]) == x[7, 11, 1, 2] / np.float32(255)  # X[row, col, channel, n]
    loaded, _ = data.load("svhn", data_dir=tmp_path)
    assert torch.equal(loaded.images, train.images)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DataError, match="test_32x32.mat"):
        data.read_svhn(tmp_path)


# ---------------------------------------------------------------------------- real datasets
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Fashion-MNIST files not installed")
def test_real_fashion_mnist():
    train, test = data.load("fashion-mnist", data_dir=FASHION_DIR)
    assert train.images.shape == (60_000, 1, 28, 28) and test.images.shape == (10_000, 1, 28, 28)
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0
    assert train.num_classes == 10
    assert torch.bincount(train.labels).tolist() == [6_000] * 10
    assert torch.bincount(test.labels).tolist() == [1_000] * 10
    mean, std = data.channel_stats(train)
    assert mean[0] == pytest.approx(0.2860, abs=1e-4) and std[0] == pytest.approx(0.3530, abs=1e-4)


def test_mnist_5k_fixed_split():
    train, test = data.load("mnist-5k")
    assert train.images.shape == (4_000, 1, 28, 28) and test.images.shape == (1_000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0
    again_train, again_test = data.load("mnist-5k")
    assert torch.equal(again_test.images, test.images) and torch.equal(again_train.labels, train.labels)
    assert not _shared_rows(train.images, test.images)


def test_digits_fixed_split():
    train, test = data.load("digits")
    assert train.images.shape == (1_437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert float(train.images.max()) == 1.0 and float(train.images.min()) == 0.0
    counts = torch.bincount(test.labels).tolist()
    assert sum(counts) == 360 and max(counts) - min(counts) <= 2
    assert torch.equal(data.load("digits")[1].labels, test.labels)
    info = data.info("digits")
    assert info.embedded and info.shape == (1, 8, 8) and info.sizes == (1_437, 360)


def _shared_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of images of `b` that also appear in `a` (bytewise)."""
    seen = {row.numpy().tobytes() for row in a.flatten(1)}
    return sum(row.numpy().tobytes() in seen for row in b.flatten(1))


# ------------------------------------------------------------------------- subsets and splits
def _toy_set(counts=(50, 30, 15, 5), seed=0) -> ImageSet:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    images = torch.arange(len(labels), dtype=torch.float32).reshape(-1, 1, 1, 1) / len(labels)
    return ImageSet(images, labels, len(counts), "toy")


def test_subset_size_stratified_deterministic():
    ds = _toy_set()
    part = data.subset(ds, 37, seed=3)
    assert len(part) == 37 and part.name == "toy" and part.num_classes == 4
    counts = torch.bincount(part.labels, minlength=4).numpy()
    proportional = np.array([50, 30, 15, 5]) * 37 / 100
    assert np.all(np.abs(counts - proportional) < 1)
    assert torch.equal(data.subset(ds, 37, seed=3).images, part.images)
    assert not torch.equal(data.subset(ds, 37, seed=4).images, part.images)
    # every image of the subset comes from ds, with its own label, without repeats
    index = (part.images.flatten() * 100).round().long()
    assert len(set(index.tolist())) == 37 and torch.equal(ds.labels[index], part.labels)


def test_subset_bounds():
    ds = _toy_set()
    assert len(data.subset(ds, 100, seed=0)) == 100 and len(data.subset(ds, 4, seed=0)) == 4
    for size in (3, 101):
        with pytest.raises(DataError, match="between num_classes = 4 and the dataset's 100"):
            data.subset(ds, size, seed=0)


def test_subset_of_real_digits():
    train, _ = data.load("digits")
    part = data.subset(train, 1_000, seed=0)
    counts = torch.bincount(part.labels).numpy()
    assert np.all(np.abs(counts - torch.bincount(train.labels).numpy() * 1_000 / len(train)) < 1)


@pytest.mark.parametrize("size_or_fraction, expected", [(20, 20), (0.25, 25)])
def test_split_validation(size_or_fraction, expected):
    ds = _toy_set()
    train, val = data.split_validation(ds, size_or_fraction, seed=1)
    assert len(val) == expected and len(train) == 100 - expected
    ids = lambda part: set((part.images.flatten() * 100).round().long().tolist())  # noqa: E731
    assert ids(train).isdisjoint(ids(val)) and ids(train) | ids(val) == set(range(100))
    counts = torch.bincount(val.labels, minlength=4).numpy()
    assert np.all(np.abs(counts - np.array([50, 30, 15, 5]) * expected / 100) < 1)
    train2, val2 = data.split_validation(ds, size_or_fraction, seed=1)
    assert torch.equal(train2.images, train.images) and torch.equal(val2.images, val.images)
    _, val3 = data.split_validation(ds, size_or_fraction, seed=2)
    assert not torch.equal(val3.images, val.images)
    for bad in (0, 100, 1.0, 0.0, -0.5):
        with pytest.raises(DataError):
            data.split_validation(ds, bad, seed=1)


def test_channel_stats():
    images = torch.zeros(4, 3, 2, 2)
    images[:, 0] = 0.5
    images[:2, 1] = 1.0
    images[:, 2] = torch.tensor([0.0, 0.2, 0.4, 0.6]).reshape(4, 1, 1)
    mean, std = data.channel_stats(ImageSet(images, torch.zeros(4, dtype=torch.int64), 2))
    assert mean == pytest.approx([0.5, 0.5, 0.3], abs=1e-7)
    assert std == pytest.approx([0.0, 0.5, float(np.std([0.0, 0.2, 0.4, 0.6]))], abs=1e-7)


# ---------------------------------------------------------------------------------- Augment
def _batch(n=8, c=1, size=12, seed=0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_augment_shape_range_and_determinism():
    x = _batch(c=3)
    augment = Augment(shift=2, scale=(0.7, 1.4), rotation=15, flip=True)
    y = augment(x, torch.Generator().manual_seed(7))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.equal(y, augment(x, torch.Generator().manual_seed(7)))
    assert not torch.equal(y, augment(x, torch.Generator().manual_seed(8)))
    assert not torch.allclose(y, x)


def test_augment_identity_when_ranges_are_zero():
    x = _batch(c=3, size=28)
    y = Augment(shift=0, scale=(1, 1), rotation=0, flip=False)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    # the resampling itself, with identity parameters, is exact up to float32 rounding
    n = x.shape[0]
    same = Augment.transform(x, torch.zeros(n, 2), torch.ones(n, 2), torch.zeros(n), torch.zeros(n, dtype=torch.bool))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)


def test_augment_integer_shift_moves_image():
    x = torch.zeros(2, 1, 10, 10)
    x[0, 0, 4, 5] = 1.0
    x[1] = _batch(n=1, size=10)[0]
    shift = torch.tensor([[2.0, -1.0], [2.0, -1.0]])  # dx = +2 (right), dy = -1 (up)
    ones = torch.ones(2, 2)
    y = Augment.transform(x, shift, ones, torch.zeros(2), torch.zeros(2, dtype=torch.bool))
    assert torch.nonzero(y[0, 0] > 0.5).tolist() == [[3, 7]]
    expected = torch.zeros(10, 10)
    expected[:9, 2:] = x[1, 0, 1:, :8]  # content moves right by 2 and up by 1, zeros come in
    torch.testing.assert_close(y[1, 0], expected, atol=1e-6, rtol=0)


def test_augment_flip_and_scale():
    x = _batch(n=2, size=8)
    flip = torch.tensor([True, False])
    y = Augment.transform(x, torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2), flip)
    torch.testing.assert_close(y[0], x[0].flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(y[1], x[1], atol=1e-6, rtol=0)
    # scale 2 about the centre (3.5): output column 0 reads the input at 3.5 - 3.5 / 2 = 1.75,
    # between a 0 (column 1) and a 1 (column 2) of the central 4×4 square: 0.75.
    big = torch.zeros(1, 1, 8, 8)
    big[0, 0, 2:6, 2:6] = 1.0
    zoomed = Augment.transform(big, torch.zeros(1, 2), torch.full((1, 2), 2.0), torch.zeros(1), torch.zeros(1, dtype=torch.bool))
    profile = torch.tensor([0.75, 1, 1, 1, 1, 1, 1, 0.75])
    torch.testing.assert_close(zoomed[0, 0], torch.outer(profile, profile), atol=1e-6, rtol=0)
    # scale per axis: sx = 2 widens only the columns
    wide = Augment.transform(big, torch.zeros(1, 2), torch.tensor([[2.0, 1.0]]), torch.zeros(1), torch.zeros(1, dtype=torch.bool))
    torch.testing.assert_close(wide[0, 0], torch.outer(big[0, 0, :, 3], profile), atol=1e-6, rtol=0)
    # +90° turns the content clockwise on screen (x right, y down): torch.rot90 with k = -1
    rotated = Augment.transform(x, torch.zeros(2, 2), torch.ones(2, 2), torch.full((2,), 90.0), torch.zeros(2, dtype=torch.bool))
    torch.testing.assert_close(rotated, torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_augment_paper_settings_and_checks():
    assert Augment.paper("cifar10") == Augment(shift=2, scale=(0.7, 1.4), rotation=0, flip=True)
    assert Augment.paper("cifar100").flip and not Augment.paper("mnist").flip and not Augment.paper("svhn").flip
    assert Augment.paper("fashion-mnist").scale == (0.7, 1.4)
    with pytest.raises(DataError, match="unknown dataset"):
        Augment.paper("imagenet")
    for bad in (dict(shift=-1), dict(scale=(1.4, 0.7)), dict(scale=(0, 1)), dict(rotation=float("nan"))):
        with pytest.raises(ValueError):
            Augment(**bad)
    with pytest.raises(TypeError, match="Generator"):
        Augment()(_batch(), 0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Augment()(torch.rand(3, 8, 8), torch.Generator())
