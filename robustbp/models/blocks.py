"""Small helpers the model builders share: activations, named layer lists, the FC head."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def make_activation(name: str) -> nn.Module:
    """A new activation module: "relu" → nn.ReLU() (not in place), "tanh" → nn.Tanh(), "logistic" → nn.Sigmoid()."""
    if name == "relu":
        return nn.ReLU(inplace=False)
    if name == "tanh":
        return nn.Tanh()
    if name == "logistic":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {name!r}; choose from relu, tanh, logistic")


class LayerList:
    """Collects (name, module) pairs with numbered names (conv1, act1, pool1, fc1, ...) for nn.Sequential."""

    def __init__(self):
        self.layers: list[tuple[str, nn.Module]] = []
        self._counts: dict[str, int] = {}

    def add(self, kind: str, module: nn.Module) -> "LayerList":
        self._counts[kind] = self._counts.get(kind, 0) + 1
        self.layers.append((f"{kind}{self._counts[kind]}", module))
        return self

    def add_once(self, name: str, module: nn.Module) -> "LayerList":
        self.layers.append((name, module))
        return self

    def sequential(self) -> nn.Sequential:
        return nn.Sequential(OrderedDict(self.layers))


@torch.no_grad()
def output_shape(layers: LayerList, in_channels: int, image_size: tuple[int, int]) -> tuple[int, ...]:
    """Shape of one image's output after `layers`, by a dummy forward (eval mode, no gradients)."""
    probe = layers.sequential()  # shares the modules; only used for this forward
    probe.eval()
    out = probe(torch.zeros(1, in_channels, *image_size))
    probe.train()
    return tuple(out.shape[1:])


def add_classifier(layers: LayerList, in_features: int, hidden: list[int], num_classes: int,
                   dropout: float, activation_name: str) -> LayerList:
    """Flatten, then FC `hidden[0]`, act, ..., FC `hidden[-1]`, act, [Dropout(dropout)], FC num_classes.

    Dropout sits on the last internal FC layer (IBP paper §7.4) and is left out when dropout = 0.
    """
    layers.add_once("flatten", nn.Flatten())
    width = in_features
    for i, units in enumerate(hidden):
        layers.add("fc", nn.Linear(width, units))
        layers.add("fc_act", make_activation(activation_name))
        if dropout > 0 and i == len(hidden) - 1:
            layers.add_once("dropout", nn.Dropout(dropout))
        width = units
    layers.add("fc", nn.Linear(width, num_classes))
    return layers
