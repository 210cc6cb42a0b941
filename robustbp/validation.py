"""The public input checks, one place for the whole package: methods, attacks, evaluation,
training and models call these at their boundary, so a bad call fails with one ValueError that
names the parameter and the value before any work is done. (The false-robustness warnings are
`robustbp.evaluate.checks`.)"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class MissingDependency(ImportError):
    """An optional dependency (the attack library) is not installed; the message says what to install."""


def check_images(x: torch.Tensor, name: str = "images") -> None:
    """Images must be a finite floating tensor of shape (N, ...) with values in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (N, ...) with a batch dimension, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contain non-finite values (nan or inf); expected values in [0, 1]")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{name} must lie in [0, 1]; the values seen range over [{low:.4g}, {high:.4g}]")


def check_labels(y: torch.Tensor, x: torch.Tensor, name: str = "labels") -> None:
    """Labels must be an integer tensor of shape (N,) matching the images' batch size."""
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape ({x.shape[0]},) to match the images, got {tuple(y.shape)}")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name} must be non-negative class indices, got minimum {int(y.min())}")


def check_nonnegative(value: float, name: str) -> float:
    """A budget such as eps, sigma or a step size: a finite number >= 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_attack_inputs(x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """An attack's images x in [0, 1], labels y for them and budget eps >= 0; returns eps as a float."""
    check_images(x, "x")
    check_labels(y, x, "y")
    return check_nonnegative(eps, "eps")


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    """A count such as steps, restarts or `first`: an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def check_gradient(gradient: str, first: int) -> None:
    """gradient is "bp" (ordinary back-propagation) or "linbp" (LinBP from the `first`-th ReLU on)."""
    check_choice(gradient, "gradient", ("bp", "linbp"))
    check_positive_int(first, "first")


def check_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: floating, finite inputs x of shape (B, ...), B ≥ 1, and integer class
    labels y of shape (B,). Returns (x, y) with y as int64 (the dtype cross-entropy takes)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"inputs x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                          torch.uint8):
        raise ValueError(f"labels y must be an integer tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must hold the same number of samples: x has shape {tuple(x.shape)}, y has shape {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"the batch is empty: x has shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("inputs x contain NaN or Inf")
    return x, y.long()


def check_logits(logits, who: str) -> None:
    """A classifier's output: one tensor of logits of shape (B, C)."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"{who}: the model must return a tensor of logits of shape (B, C); it returned a "
            f"{type(logits).__name__} (wrap it so that forward returns the logits alone)"
        )
    if logits.dim() != 2:
        raise ValueError(f"{who}: the model must return logits of shape (B, C), got {tuple(logits.shape)}")


def check_integer(value, name: str, minimum: int = 1, also: tuple = ()) -> int:
    """A count: an integer ≥ minimum (an integral float such as 2.0 from a config file is accepted),
    or one of the special values in `also` (e.g. -1 for "exact")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or (
            int(value) < minimum and int(value) not in also):
        extra = "".join(f", or {v}" for v in also)
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")
    return int(value)


def check_positive(value, name: str) -> float:
    number = check_nonnegative(value, name)
    if number == 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_fraction(value, name: str) -> float:
    number = check_nonnegative(value, name)
    if number > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return number


def check_interval(value, name: str) -> tuple[float, float] | None:
    """None, or a pair (low, high) of finite numbers with low < high."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be a pair (low, high) of finite numbers with low < high, got {value!r}")
    return (low, high)
