"""Deterministic stratified subsets and validation splits, and per-channel statistics.

The IBP paper's dataset-size study (§5.2, Fig. 2) trains on MNIST subsets of 1k … 60k samples;
`subset(ds, size, seed)` draws such a subset with every class in proportion. β is chosen "by
cross-validation within the training set" (§7.4): `split_validation` holds out part of it.

Randomness comes only from `numpy.random.default_rng(seed)` (PCG64, the same on every platform).
Returned ImageSets keep the parent's `.name`, and their indices are in the parent's order.
"""
from __future__ import annotations

import numpy as np
import torch

from .imageset import ImageSet
from .readers import DataError


def stratified_counts(class_counts: np.ndarray, size: int) -> np.ndarray:
    """Per-class counts summing to `size`, each within 1 of size·n_c/N (largest remainders).

    Ties in the remainders go to the lower class index, so the result is deterministic.
    """
    total = int(class_counts.sum())
    quota = class_counts * size / total
    counts = np.floor(quota).astype(np.int64)
    remainders = quota - counts
    order = np.lexsort((np.arange(len(quota)), -remainders))  # largest remainder first, then lower class
    counts[order[: size - int(counts.sum())]] += 1
    return counts


def stratified_indices(labels: torch.Tensor, size: int, num_classes: int, seed: int) -> torch.Tensor:
    """`size` indices into `labels`, stratified by class, drawn with `default_rng(seed)`; sorted int64."""
    labels_np = labels.cpu().numpy()
    class_counts = np.bincount(labels_np, minlength=num_classes)
    counts = stratified_counts(class_counts, size)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels_np == c))[:k] for c, k in enumerate(counts)]
    return torch.from_numpy(np.sort(np.concatenate(chosen)).astype(np.int64))


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def subset(ds: ImageSet, size: int, seed: int) -> ImageSet:
    """A stratified random subset of exactly `size` samples (class counts within 1 of proportional).

    Same (ds, size, seed) → same subset. Raises DataError unless num_classes ≤ size ≤ len(ds).
    """
    seed = _check_seed(seed)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise DataError(f"subset size must be an integer, got {size!r}")
    if not ds.num_classes <= size <= len(ds):
        raise DataError(
            f"subset of {ds.name or 'dataset'}: size must be between num_classes = {ds.num_classes} "
            f"and the dataset's {len(ds)} samples, got {size}"
        )
    return ds.take(stratified_indices(ds.labels, int(size), ds.num_classes, seed))


def split_validation(ds: ImageSet, size_or_fraction: int | float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split `ds` into disjoint (train, val), val stratified by class and drawn with `seed`.

    size_or_fraction: an int ≥ 1 is the number of validation samples; a float in (0, 1) the
    fraction of `ds` (rounded to the nearest count). Both parts must be non-empty.
    """
    seed = _check_seed(seed)
    if isinstance(size_or_fraction, bool) or not isinstance(size_or_fraction, (int, float, np.integer, np.floating)):
        raise DataError(f"validation size must be an int or a fraction in (0, 1), got {size_or_fraction!r}")
    if isinstance(size_or_fraction, (float, np.floating)):
        if not 0.0 < size_or_fraction < 1.0:
            raise DataError(f"validation fraction must lie in (0, 1), got {size_or_fraction}")
        size = int(round(size_or_fraction * len(ds)))
    else:
        size = int(size_or_fraction)
    if not 1 <= size < len(ds):
        raise DataError(f"validation size must be between 1 and {len(ds) - 1} for {len(ds)} samples, got {size}")
    val_index = stratified_indices(ds.labels, size, ds.num_classes, seed)
    in_val = torch.zeros(len(ds), dtype=torch.bool)
    in_val[val_index] = True
    return ds.take(torch.nonzero(~in_val).flatten()), ds.take(val_index)


def channel_stats(ds: ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) standard deviation over all images and pixels.

    These are the `mean`/`std` of a model's Normalize layer (spectral paper §4.1: "channelwise
    mean of 0 and a standard deviation of 1"). Computed in float64.
    """
    if len(ds) == 0:
        raise DataError(f"channel_stats of {ds.name or 'dataset'}: the dataset is empty")
    total = torch.zeros(ds.images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in ds.images.split(4096):  # float64 per chunk, not a float64 copy of the whole set
        chunk = chunk.to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = ds.images.numel() // ds.images.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    return mean.tolist(), std.tolist()
