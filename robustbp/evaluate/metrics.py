"""Accuracy under clean, noisy and adversarial inputs.

Conventions: images (N, ...) in [0, 1], labels (N,) class indices; accuracies and errors are
fractions in [0, 1]; an attack success rate is the share of points the model classifies
correctly whose adversarial version it misclassifies (LinBP paper §4.2.1).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from robustbp.attacks.gradient_attacks import DIRECTIONS, gradient_noise
from robustbp.modes import eval_mode
from robustbp.validation import check_images, check_labels, check_nonnegative

BATCH_SIZE = 256


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Predicted classes argmax f(x), shape (N,), in eval mode (each submodule's mode restored after),
    in batches, without gradients."""
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]).argmax(dim=1) for i in range(0, x.shape[0], batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = BATCH_SIZE) -> float:
    """The one accuracy of the package: #{i : argmax f(xᵢ) = yᵢ} / N, a fraction in [0, 1] (see `predict`)."""
    check_images(x, "images")
    check_labels(y, x, "labels")
    return int((predict(model, x, batch_size) == y).sum()) / len(y)


def attack_success_rate(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, batch_size: int = BATCH_SIZE
) -> float:
    """ASR = #{i : f(xᵢ) = yᵢ and f(x̃ᵢ) ≠ yᵢ} / #{i : f(xᵢ) = yᵢ}; nan when no point is correct."""
    correct = predict(model, x, batch_size) == y
    if not bool(correct.any()):
        return float("nan")
    fooled = predict(model, x_adv, batch_size) != y
    return float((fooled & correct).sum()) / float(correct.sum())


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x̃ = clip(x + N(0, σ²), 0, 1), independent per pixel (spectral paper Eq. 9)."""
    sigma = check_nonnegative(sigma, "sigma")
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return (x + sigma * noise).clamp(0.0, 1.0)


def _accuracy_rows(accuracies: list[float], clean: float) -> dict:
    """A curve's "accuracy", "error" (1 - accuracy) and "drop" (clean accuracy - accuracy) lists."""
    return {
        "accuracy": accuracies,
        "error": [1.0 - a for a in accuracies],
        "drop": [clean - a for a in accuracies],
    }


def noise_curve(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigmas: Sequence[float], seed: int = 0
) -> dict:
    """Error under Gaussian noise for each σ (spectral paper §4.2.1, Fig. 3 left; IBP Fig. 4).

    For each σ the noise is σ·z with z ~ N(0, I) drawn from a generator seeded with `seed`: every
    model called with the same seed sees the same noisy images, and the curve over σ scales one
    draw (common random numbers, so it is smooth in σ). Returns {"sigma": [...], "accuracy": [...],
    "error": [...], "drop": [...]}, drop = clean accuracy - accuracy under noise; at σ = 0 the
    images are unchanged and the drop is 0.
    """
    check_images(x, "images")
    check_labels(y, x, "labels")
    sigmas = [check_nonnegative(s, "sigma") for s in sigmas]
    clean = accuracy(model, x, y)
    accuracies = []
    for sigma in sigmas:
        noisy = gaussian_noise(x, sigma, torch.Generator(device=x.device).manual_seed(seed)) if sigma > 0 else x
        accuracies.append(accuracy(model, noisy, y))
    return {"sigma": sigmas, **_accuracy_rows(accuracies, clean), "clean_accuracy": clean}


def batched_attack(
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = BATCH_SIZE,
) -> torch.Tensor:
    """Run `attack(x_batch, y_batch) -> x_adv_batch` over batches and concatenate."""
    return torch.cat([attack(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def gradient_noise_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_values: Sequence[float],
    direction: str = "sign",
    gradient: str = "bp",
    first: int = 1,
) -> dict:
    """Error under one gradient step x̃ = clip(x + ε·sign(∇ₓL)) or clip(x + ε·∇ₓL), per ε
    (IBP paper, later version, §5.2, Fig. 2). Returns {"eps", "accuracy", "error", "drop",
    "attack_success_rate"} lists over ε and "clean_accuracy"."""
    check_images(x, "images")
    check_labels(y, x, "labels")
    eps_values = [check_nonnegative(e, "eps") for e in eps_values]
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose one of {', '.join(map(repr, DIRECTIONS))}")
    clean = accuracy(model, x, y)
    accuracies, success = [], []
    for eps in eps_values:
        x_adv = batched_attack(lambda xb, yb: gradient_noise(model, xb, yb, eps, direction, gradient, first), x, y)
        accuracies.append(accuracy(model, x_adv, y))
        success.append(attack_success_rate(model, x, x_adv, y))
    return {"eps": eps_values, **_accuracy_rows(accuracies, clean), "attack_success_rate": success,
            "clean_accuracy": clean}
