"""In-house gradient attacks: FGSM, the adversarial-noise step, PGD (L∞ and L2) and TPGD.

They live here, in torch, because adversarial training calls them inside a training step and
because LinBP needs to change their backward pass (`gradient="linbp"`). Every function takes
images in [0, 1] of shape (B, ...) and returns adversarial images of the same shape, in [0, 1].
The model is used as given: its train/eval mode and its parameters' `.grad` are left unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustbp.validation import (
    check_attack_inputs,
    check_choice,
    check_gradient,
    check_images,
    check_nonnegative,
    check_positive_int,
)
from robustbp.attacks.gradients import LOSSES, loss_and_gradient, per_sample_loss

NORMS = ("linf", "l2")
DIRECTIONS = ("sign", "gradient")
_TINY = 1e-12


def gradient_noise(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    direction: str = "sign",
    gradient: str = "bp",
    first: int = 1,
) -> torch.Tensor:
    """One step along the loss gradient (IBP paper, later version, Eq. 4 and Fig. 2).

    direction="sign":     x̃ = clip(x + ε·sign(∇ₓL), 0, 1)   (FGSM, the "L1" variant)
    direction="gradient": x̃ = clip(x + ε·∇ₓL, 0, 1)         (the "L2" variant, unnormalized)
    with L = Σᵢ CE(f(xᵢ), yᵢ), so each point moves along its own loss gradient.
    """
    eps = check_attack_inputs(x, y, eps)
    check_choice(direction, "direction", DIRECTIONS)
    check_gradient(gradient, first)
    grad = loss_and_gradient(model, x, y, "ce", gradient, first)[1]
    move = grad.sign() if direction == "sign" else grad
    return (x + eps * move).clamp(0.0, 1.0).detach()


def fgsm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, gradient: str = "bp", first: int = 1
) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2014): x̃ = clip(x + ε·sign(∇ₓ CE), 0, 1)."""
    return gradient_noise(model, x, y, eps, "sign", gradient, first)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    norm: str = "linf",
    restarts: int = 1,
    loss: str = "ce",
    gradient: str = "bp",
    first: int = 1,
    generator: torch.Generator | None = None,
    random_start: bool = True,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018; spectral paper Eq. 10), untargeted.

    Each restart starts at x + δ₀ (δ₀ uniform in the ε-ball when random_start, else 0), then
    `steps` times:
        L∞: x ← Π(x + step·sign(∇L)),          Π: clamp δ to [-ε, ε], then x to [0, 1]
        L2: x ← Π(x + step·∇L/‖∇L‖₂),          Π: scale δ to ‖δ‖₂ ≤ ε, then x to [0, 1]
    (clipping to [0, 1] after the projection never leaves the ball, since x itself is in [0, 1]).
    Per point, the result of the best restart is returned: one that misclassifies (argmax ≠ y),
    else the one with the highest final loss.

    loss="ce" is the cross-entropy with labels y; loss="kl" is KL(softmax f(x) ‖ softmax f(x+δ)),
    which makes this TPGD (y then only ranks the restarts; a random start is needed, as the KL
    gradient vanishes at δ = 0). gradient="linbp" uses LinBP gradients from the `first`-th ReLU.
    Shapes: x (B, ...), y (B,) -> (B, ...). Defaults: one restart, random start, BP.
    """
    eps = check_attack_inputs(x, y, eps)
    step = check_nonnegative(step, "step")
    check_positive_int(steps, "steps", minimum=0)
    check_choice(norm, "norm", NORMS)
    check_positive_int(restarts, "restarts")
    check_choice(loss, "loss", LOSSES)
    check_gradient(gradient, first)
    return pgd_checkpoints(
        model, x, y, eps, step, [steps], norm, restarts, loss, gradient, first, generator, random_start
    )[0]


def tpgd(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    norm: str = "linf",
    restarts: int = 1,
    gradient: str = "bp",
    first: int = 1,
    generator: torch.Generator | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """TPGD (Zhang et al. 2019, TRADES; spectral paper §4.2.2): PGD on KL(softmax f(x) ‖ softmax f(x+δ)).

    Needs no labels; `y` (default: the model's predictions at x) only ranks restarts. A random
    start in the ε-ball is used (torchattacks starts at x + 0.001·N(0, I) instead).
    """
    check_images(x, "x")
    if y is None:
        with torch.no_grad():
            y = model(x).argmax(dim=1)
    return pgd(model, x, y, eps, step, steps, norm, restarts, "kl", gradient, first, generator)


def random_start_in_ball(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None
) -> torch.Tensor:
    """δ₀ uniform in the ε-ball: L∞ uniform in [-ε, ε]^d; L2 uniform in the ball (direction
    N(0, I)/‖·‖, radius ε·U^(1/d))."""
    device = generator.device if generator is not None else x.device
    if norm == "linf":
        uniform = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
        return ((2 * uniform - 1) * eps).to(x.device)
    direction = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *[1] * (x.dim() - 1))
    dim = x[0].numel()
    radius = torch.rand(x.shape[0], generator=generator, device=device, dtype=x.dtype).to(x.device) ** (1.0 / dim)
    return direction * (eps * radius).view(-1, *[1] * (x.dim() - 1))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Π: bring δ = x_adv - x into the ε-ball, then x + δ into [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta_norm = delta.flatten(1).norm(dim=1)
        factor = (eps / delta_norm.clamp_min(_TINY)).clamp(max=1.0)
        delta = delta * factor.view(-1, *[1] * (x.dim() - 1))
    return (x + delta).clamp(0.0, 1.0)


def pgd_checkpoints(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    checkpoints: Sequence[int],
    norm: str = "linf",
    restarts: int = 1,
    loss: str = "ce",
    gradient: str = "bp",
    first: int = 1,
    generator: torch.Generator | None = None,
    random_start: bool = True,
) -> list[torch.Tensor]:
    """PGD results after each number of steps in `checkpoints`, from one run per restart.

    Equal to calling `pgd(..., steps=k)` with the same generator state for each k in
    `checkpoints` (the random draws happen only at each restart's start), at the cost of
    the largest k. Inputs are not validated here; `pgd` does that.
    """
    wanted = sorted(set(int(k) for k in checkpoints))
    x = x.detach()
    with torch.no_grad():
        target = torch.softmax(model(x), dim=1) if loss == "kl" else y
    best = {k: x.clone() for k in wanted}
    best_success = {k: torch.zeros(x.shape[0], dtype=torch.bool, device=x.device) for k in wanted}
    best_loss = {k: torch.full((x.shape[0],), -float("inf"), device=x.device) for k in wanted}

    def record(k: int, x_adv: torch.Tensor) -> None:
        with torch.no_grad():
            logits = model(x_adv)
            losses = per_sample_loss(logits, target, loss)
            success = logits.argmax(dim=1) != y
        better = (success & ~best_success[k]) | ((success == best_success[k]) & (losses > best_loss[k]))
        best[k][better] = x_adv[better]
        best_success[k] = best_success[k] | better & success
        best_loss[k] = torch.where(better, losses, best_loss[k])

    for _ in range(restarts):
        x_adv = x.clone()
        if random_start and eps > 0:
            x_adv = project(x + random_start_in_ball(x, eps, norm, generator), x, eps, norm)
        if 0 in wanted:
            record(0, x_adv)
        for k in range(1, wanted[-1] + 1):
            grad = loss_and_gradient(model, x_adv, target, loss, gradient, first)[1]
            if norm == "linf":
                move = grad.sign()
            else:
                move = grad / grad.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *[1] * (x.dim() - 1))
            x_adv = project(x_adv + step * move, x, eps, norm).detach()
            if k in wanted:
                record(k, x_adv)
    return [best[k] for k in checkpoints]
