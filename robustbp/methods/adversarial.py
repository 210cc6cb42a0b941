"""Adversarial training (Goodfellow et al. 2015) and adversarial back-propagation (Nøkland 2015)."""
from __future__ import annotations

import torch

from ..passes import Linearization
from ..validation import check_nonnegative
from .base import Method, deliver, register
from .ibp import main_loss_terms


@register("adversarial")
class Adversarial(Method):
    """α·L(x) + (1−α)·L(x*), x* = x + ε·sign(g) (`norm="sign"`) or x + ε·g (`norm="grad"`),
    with x* held constant and optionally clipped to `clip` = (low, high).

    `variant="fast"`: the objective is L(x*) alone, so the pass at x computes only g and no
    weight gradients (the IBP paper's Fast Adversarial Training, about 20% cheaper).
    """

    holds_constant = "x* (the adversarial input is data)"

    def __init__(
        self,
        eps: float = 0.1,
        alpha: float = 0.5,
        norm: str = "sign",
        variant: str = "original",
        clip: tuple[float, float] | None = None,
        loss_fn=None,
    ):
        super().__init__(loss_fn)
        check_nonnegative(eps, f"{self.name}: eps")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{self.name}: alpha must lie in [0, 1], got {alpha}")
        if norm not in ("sign", "grad"):
            raise ValueError(f"{self.name}: norm must be 'sign' or 'grad', got {norm!r}")
        if variant not in ("original", "fast"):
            raise ValueError(f"{self.name}: variant must be 'original' or 'fast', got {variant!r}")
        if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
            raise ValueError(f"{self.name}: clip must be a pair (low, high) with low < high, got {clip!r}")
        self.eps, self.alpha, self.norm, self.variant = float(eps), float(alpha), norm, variant
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))

    def _backward(self, model, x, y, params):
        x = x.detach().requires_grad_(True)
        weight_of_clean = self.alpha if self.variant == "original" else 0.0
        if weight_of_clean > 0:  # g and the clean loss's parameter gradient from one backward
            lin = Linearization.record(model, x, capture_weights=True)
            clean_loss = self.main_loss(lin.logits, y)
            input_grad, clean_terms = main_loss_terms(lin, clean_loss, x, scale=weight_of_clean)
        else:
            clean_loss = self.main_loss(model(x), y)
            (input_grad,) = torch.autograd.grad(clean_loss, x)
            clean_terms = []
        step = input_grad.sign() if self.norm == "sign" else input_grad * x.shape[0]
        adversarial_x = (x + self.eps * step).detach()
        if self.clip is not None:
            adversarial_x = adversarial_x.clamp(*self.clip)
        adversarial_loss = self.per_sample_loss(model(adversarial_x), y).mean()
        deliver(params, clean_terms + [((1 - weight_of_clean) * adversarial_loss, None)])
        objective = weight_of_clean * clean_loss.item() + (1 - weight_of_clean) * adversarial_loss.item()
        return clean_loss.item(), objective - clean_loss.item()


@register("adversarial-backprop")
class AdversarialBackprop(Adversarial):
    """Adversarial back-propagation (Nøkland 2015, Alg. 1): the objective L(x + ε·sign(g)), i.e.
    the fast sign variant of adversarial training."""

    def __init__(self, eps: float = 0.08, clip: tuple[float, float] | None = None, loss_fn=None):
        super().__init__(eps=eps, alpha=0.0, norm="sign", variant="fast", clip=clip, loss_fn=loss_fn)
