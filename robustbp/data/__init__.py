"""Datasets as in-memory ImageSets (images float32 (N, C, H, W) in [0, 1], labels int64).

    from robustbp import data
    train, test = data.load("mnist-5k")                 # embedded, no files needed
    train, test = data.load("cifar10", data_dir="~/datasets")   # or set ROBUSTBP_DATA
    train, val = data.split_validation(train, 0.1, seed=0)
    small = data.subset(train, 1000, seed=0)            # IBP paper §5.2 dataset-size study
    mean, std = data.channel_stats(train)               # for the model's Normalize layer
    augment = data.Augment.paper("cifar10")             # IBP paper §7.4; training batches only
    batch = augment(images, generator)

Nothing is downloaded: on-disk datasets are read from a folder (see `registry`).
"""
from .augment import Augment
from .imageset import ImageSet
from .readers import DataError
from .readers import read_cifar
from .readers import read_idx
from .readers import read_svhn
from .registry import DatasetInfo
from .registry import available
from .registry import info
from .registry import load
from .registry import register
from .splits import channel_stats
from .splits import split_validation
from .splits import subset

__all__ = [
    "Augment",
    "DataError",
    "DatasetInfo",
    "ImageSet",
    "available",
    "channel_stats",
    "info",
    "load",
    "read_cifar",
    "read_idx",
    "read_svhn",
    "register",
    "split_validation",
    "subset",
]
