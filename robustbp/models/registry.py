"""The model registry: `@register(name, min_image_size=...)`, `available()`, `info(name)`, `get(name, ...)`.

A builder is a function of keyword arguments, any subset of
    in_channels, image_size (H, W), num_classes, mean, std, dropout, activation
returning an nn.Module. `get` validates the arguments once, here, and refuses a non-default
value for a parameter the builder does not take (for example dropout for a net with no
internal FC layer) instead of silently ignoring it.

Every registered model starts with `Normalize` (images stay in [0, 1]) and uses only operations
with an explicit rule in `robustbp.operations` (tests/test_models.py checks it), so that every
method takes its fast path on the papers' models.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from ..layers import Normalize

ACTIVATIONS = ("relu", "tanh", "logistic")
DEFAULTS = dict(in_channels=1, image_size=28, num_classes=10, mean=0.0, std=1.0, dropout=0.0, activation="relu")


@dataclass(frozen=True)
class ModelInfo:
    """name; builder; min_image_size: the smallest H and W the network accepts; description
    (first docstring line); parameters: which of `get`'s parameters the builder takes."""

    name: str
    builder: Callable[..., nn.Module]
    min_image_size: int
    description: str
    parameters: tuple[str, ...]


_REGISTRY: dict[str, ModelInfo] = {}


def register(name: str, min_image_size: int = 1):
    """Decorator: register a builder under `name` (timm's `@register_model`)."""

    def decorate(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        accepted = tuple(p for p in inspect.signature(builder).parameters if p in DEFAULTS)
        description = (inspect.getdoc(builder) or "").split("\n")[0]
        _REGISTRY[name] = ModelInfo(name, builder, min_image_size, description, accepted)
        return builder

    return decorate


def available() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def _image_size(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return size


def _per_channel(value, in_channels: int, what: str) -> list[float]:
    values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) not in (1, in_channels):
        raise ValueError(f"{what} must be one number or {in_channels} (one per channel), got {len(values)}")
    return values


def get(
    name: str,
    in_channels: int = 1,
    image_size: int | tuple[int, int] = 28,
    num_classes: int = 10,
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    dropout: float = 0.0,
    activation: str = "relu",
) -> nn.Module:
    """Build model `name` for images (in_channels, H, W) in [0, 1], returning logits (N, num_classes).

    mean, std: Normalize's per-channel statistics (e.g. from `robustbp.data.channel_stats`).
    dropout: probability on the last internal FC layer (IBP paper §7.4); 0 adds no Dropout.
    activation: "relu", "tanh" or "logistic" (sigmoid) for every hidden nonlinearity.
    Raises ValueError for an unknown name, an invalid value, a parameter the model does not
    support, or images smaller than the model's `min_image_size`.
    """
    model = info(name)
    size = _image_size(image_size)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int ≥ 2, got {num_classes!r}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    if min(size) < model.min_image_size:
        raise ValueError(
            f"model {name!r} needs images of at least {model.min_image_size}×{model.min_image_size} pixels, "
            f"got {size[0]}×{size[1]}"
        )
    given = dict(in_channels=in_channels, image_size=size, num_classes=num_classes,
                 mean=_per_channel(mean, in_channels, "mean"), std=_per_channel(std, in_channels, "std"),
                 dropout=float(dropout), activation=activation)
    for parameter in DEFAULTS:
        if parameter not in model.parameters and given[parameter] != _normalized_default(parameter):
            raise ValueError(
                f"model {name!r} does not support {parameter}={given[parameter]!r}; "
                f"it takes {', '.join(model.parameters)}"
            )
    return model.builder(**{p: given[p] for p in model.parameters})


def _normalized_default(parameter: str):
    value = DEFAULTS[parameter]
    if parameter == "image_size":
        return (value, value)
    if parameter in ("mean", "std"):
        return [value]
    return value
