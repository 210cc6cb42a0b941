"""Fully connected networks: Normalize, Flatten, hidden FC layers with one activation, logits.

| model            | paper                                                        |
|------------------|--------------------------------------------------------------|
| mlp-2x256        | IBP paper §5.5, Table 2 (MNIST)                              |
| mlp-3x256        | IBP paper §5.5, Table 2 (CIFAR-10)                           |
| mlp-2x400/800/1200 | adversarial back-propagation (Nøkland), Table 2, permutation-invariant MNIST; activation relu, tanh or logistic |
| mlp-400-200-100  | LinBP paper §4.2.2 (MNIST MLP)                               |

C×H×W → Flatten C·H·W → FC h₁ → act → … → FC h_k → act → [Dropout] → FC classes. Any image size.
"""
from __future__ import annotations

from ..layers import Normalize
from .blocks import LayerList, add_classifier
from .registry import register

MLP_WIDTHS = {
    "mlp-2x256": ([256, 256], "IBP paper §5.5 Table 2 (MNIST)"),
    "mlp-3x256": ([256, 256, 256], "IBP paper §5.5 Table 2 (CIFAR-10)"),
    "mlp-2x400": ([400, 400], "adversarial back-propagation (Nøkland) Table 2"),
    "mlp-2x800": ([800, 800], "adversarial back-propagation (Nøkland) Table 2"),
    "mlp-2x1200": ([1200, 1200], "adversarial back-propagation (Nøkland) Table 2"),
    "mlp-400-200-100": ([400, 200, 100], "LinBP paper §4.2.2 (MNIST)"),
}


def mlp(in_channels, image_size, num_classes, mean, std, dropout, activation, hidden: list[int]):
    """Normalize → Flatten → [FC h → act] for h in hidden → [Dropout] → FC num_classes."""
    layers = LayerList().add_once("normalize", Normalize(mean, std))
    in_features = in_channels * image_size[0] * image_size[1]
    return add_classifier(layers, in_features, hidden, num_classes, dropout, activation).sequential()


def _register_mlp(name: str, hidden: list[int], source: str) -> None:
    def build(in_channels, image_size, num_classes, mean, std, dropout, activation):
        return mlp(in_channels, image_size, num_classes, mean, std, dropout, activation, hidden)

    build.__name__ = name.replace("-", "_")
    build.__doc__ = f"Fully connected {' → '.join(map(str, hidden))} hidden units ({source}); relu, tanh or logistic."
    register(name)(build)


for _name, (_hidden, _source) in MLP_WIDTHS.items():
    _register_mlp(_name, _hidden, _source)
