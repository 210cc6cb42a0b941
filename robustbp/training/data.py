"""The data a run trains on: the splits its config draws, the model's arguments computed from the
training images, and the augmentation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from robustbp.training.config import TrainConfig


@dataclass
class Splits:
    train: Any
    val: Any | None
    test: Any


def prepare_data(config: TrainConfig, data: tuple | None = None) -> Splits:
    """(train, validation, test) ImageSets: the validation split is drawn first, then the
    training subset of `train_size` images from what remains; both seeded by `config.seed`."""
    from robustbp import data as datasets

    if data is None:
        train_set, test_set = datasets.load(config.dataset, config.data_dir)
    else:
        train_set, test_set = data
    val_set = None
    if config.val_size > 0:
        size = int(config.val_size) if config.val_size >= 1 else config.val_size
        train_set, val_set = datasets.split_validation(train_set, size, seed=config.seed)
    if config.train_size is not None:
        if config.train_size > len(train_set):
            raise ValueError(
                f"train_size {config.train_size} is larger than the {len(train_set)} training images of {config.dataset}"
            )
        train_set = datasets.subset(train_set, config.train_size, seed=config.seed)
    return Splits(train_set, val_set, test_set)


def model_args_for(config: TrainConfig, train_set) -> dict[str, Any]:
    """What `models.get` needs, computed from the training set (saved so a run loads without its data)."""
    from robustbp import data as datasets

    mean, std = datasets.channel_stats(train_set)
    channels, height, width = train_set.shape
    return {
        "name": config.model,
        "in_channels": channels,
        "image_size": height if height == width else (height, width),
        "num_classes": train_set.num_classes,
        "mean": [float(v) for v in torch.as_tensor(mean).flatten()],
        "std": [float(v) for v in torch.as_tensor(std).flatten()],
        "dropout": config.dropout,
        "activation": config.activation,
    }


def augmentation(config: TrainConfig):
    """The paper's augmentation for the dataset when `config.augment` (MNIST's for data given
    directly), else None."""
    from robustbp import data as datasets

    if not config.augment:
        return None
    if config.dataset in datasets.available():
        return datasets.Augment.paper(config.dataset)
    return datasets.Augment()
