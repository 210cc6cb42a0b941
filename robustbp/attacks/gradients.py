"""Input gradients by back-propagation (BP) or linear back-propagation (LinBP).

LinBP (Guo et al. 2020; Li et al., *A Theoretical View of Linear Backpropagation*, §2, Eq. 7) keeps
the forward pass and, in the backward pass, replaces the derivative of every ReLU from the
`first`-th on (1-based, forward order) by 1. The rule lives in
`robustbp.methods.linbp.linbp_backward(model, first)`; this module only runs a forward and a
backward pass inside it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustbp.validation import check_gradient, check_images, check_labels
from robustbp.methods.linbp import linbp_backward

LOSSES = ("ce", "kl")


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of each sample, shape (B,).

    "ce": cross-entropy  L = -log softmax(f(x))_y, `target` = labels (B,).
    "kl": KL(p_clean || p_adv) = sum_k p_clean,k (log p_clean,k - log softmax(f(x+δ))_k),
          `target` = clean probabilities (B, C), held fixed (TPGD, Zhang et al. 2019).
    """
    if loss == "ce":
        return F.cross_entropy(logits, target, reduction="none")
    if loss == "kl":
        return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="none").sum(dim=1)
    raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(map(repr, LOSSES))}")


def loss_and_gradient(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss: str = "ce", gradient: str = "bp", first: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss (B,) and ∇ₓ of the summed loss (shape of x), without validation.

    Only the input gets a gradient: parameters' `.grad` are not touched, and the model's
    train/eval mode is used as given. gradient="linbp" on a model that applies no ReLU raises
    ValueError (LinBP would be BP).
    """
    x_var = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if gradient == "linbp":
            with linbp_backward(model, first):
                losses = per_sample_loss(model(x_var), target, loss)
                (grad,) = torch.autograd.grad(losses.sum(), x_var)
        else:
            losses = per_sample_loss(model(x_var), target, loss)
            (grad,) = torch.autograd.grad(losses.sum(), x_var)
    return losses.detach(), grad.detach()


def input_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, gradient: str = "bp", first: int = 1
) -> torch.Tensor:
    """∇ₓ Σᵢ CE(f(xᵢ), yᵢ), same shape as x (B, ...).

    gradient="bp" is ordinary back-propagation; gradient="linbp" treats every ReLU from the
    `first`-th (1-based, forward order) as the identity in the backward pass (LinBP paper, Eq. 7).
    Images must lie in [0, 1]; the model's mode and its parameters' `.grad` are left unchanged.
    """
    check_images(x, "x")
    check_labels(y, x, "y")
    check_gradient(gradient, first)
    return loss_and_gradient(model, x, y, "ce", gradient, first)[1]


def gradient_health(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict:
    """Share of points whose input gradient (BP, cross-entropy) is all zero or has a non-finite entry.

    A large share of such points means gradient attacks cannot move them: a sign of gradient
    masking (auto-attack `checks.py`, zero-gradient check). Returns
    {"zero_share", "nonfinite_share", "n"} with shares in [0, 1].
    """
    check_images(x, "x")
    check_labels(y, x, "y")
    n_zero = n_nonfinite = 0
    for i in range(0, x.shape[0], batch_size):
        grad = loss_and_gradient(model, x[i : i + batch_size], y[i : i + batch_size], "ce", "bp", 1)[1].flatten(1)
        nonfinite = ~torch.isfinite(grad).all(dim=1)
        n_nonfinite += int(nonfinite.sum())
        n_zero += int(((grad == 0).all(dim=1) & ~nonfinite).sum())
    n = x.shape[0]
    return {"zero_share": n_zero / n, "nonfinite_share": n_nonfinite / n, "n": n}
