"""Adversarial training (Goodfellow et al. 2015) and adversarial back-propagation (Nøkland 2015)."""
from __future__ import annotations

import torch

from ..passes import Linearization, holds_sync_batch_norm, is_compiled
from ..modes import preserved_running_statistics
from ..validation import check_fraction, check_interval, check_nonnegative
from .base import Method, choice, deliver, parameter, register
from .ibp import main_loss_terms


def _two_numbers(text: str) -> list[float]:
    """Command-line text "LOW,HIGH" -> [low, high]."""
    return [float(part) for part in text.split(",")]


@register("adversarial")
class Adversarial(Method):
    """α·L(x) + (1−α)·L(x*), x* = x + ε·sign(g) (`norm="sign"`) or x + ε·g (`norm="grad"`),
    with x* held constant and optionally clipped to `clip` = (low, high).

    `variant="fast"`: the objective is L(x*) alone, so the pass at x computes only g and no
    weight gradients (the IBP paper's Fast Adversarial Training, about 20% cheaper).
    In train mode, BatchNorm's running statistics are updated by the clean forward only, once per
    step (the forward at x* uses the batch's statistics but leaves the running ones as they were).
    """

    holds_constant = "x* (the adversarial input is data)"

    eps: float = parameter(0.1, "perturbation size ε of the adversarial examples, in pixel units ([0, 1] images)",
                           check_nonnegative)
    alpha: float = parameter(0.5, "weight of the clean loss, in [0, 1]", check_fraction)
    norm: str = parameter("sign", "adversarial direction: sign (L∞, FGSM) or grad (the gradient itself)",
                          choice("sign", "grad"), parse=str)
    variant: str = parameter("original", "original, or fast (the IBP paper's: L(x*) alone)",
                             choice("original", "fast"), parse=str, bench=("fast",))
    clip: tuple | None = parameter(None, "clip adversarial images to LOW,HIGH, e.g. 0,1", check_interval,
                                   parse=_two_numbers)

    def _backward(self, model, x, y, params):
        weight_of_clean = self.alpha if self.variant == "original" else 0.0
        return adversarial_backward(self, model, x, y, params, self.eps, weight_of_clean, self.norm, self.clip)


def adversarial_backward(method, model, x, y, params, eps, weight_of_clean, norm, clip):
    """α·L(x) + (1−α)·L(x*); BatchNorm's running statistics are updated by the clean forward only."""
    x = x.detach().requires_grad_(True)
    recordable = not is_compiled(model) and not holds_sync_batch_norm(model)
    if weight_of_clean > 0 and recordable:  # g and the clean loss's θ-gradient from one backward
        lin = Linearization.record(model, x, capture_weights=True)
        clean_loss = method.main_loss(lin.logits, y)
        input_grad, clean_terms = main_loss_terms(lin, clean_loss, x, scale=weight_of_clean)
    elif weight_of_clean > 0:
        clean_loss = method.main_loss(model(x), y)
        (input_grad,) = torch.autograd.grad(clean_loss, x, retain_graph=True)
        clean_terms = [(weight_of_clean * clean_loss, None)]
    else:
        clean_loss = method.main_loss(model(x), y)
        (input_grad,) = torch.autograd.grad(clean_loss, x)
        clean_terms = []
    step = input_grad.sign() if norm == "sign" else input_grad * x.shape[0]
    adversarial_x = (x + eps * step).detach()
    if clip is not None:
        adversarial_x = adversarial_x.clamp(*clip)
    with preserved_running_statistics(model):  # put back after the backward, which still reads them
        adversarial_loss = method.per_sample_loss(model(adversarial_x), y).mean()
        deliver(params, clean_terms + [((1 - weight_of_clean) * adversarial_loss, None)])
    objective = weight_of_clean * clean_loss.item() + (1 - weight_of_clean) * adversarial_loss.item()
    return clean_loss.item(), objective - clean_loss.item()


@register("adversarial-backprop")
class AdversarialBackprop(Method):
    """Adversarial back-propagation (Nøkland 2015, Alg. 1): the objective L(x + ε·sign(g)), i.e.
    the fast sign variant of adversarial training. BatchNorm's running statistics are updated by
    the clean forward only."""

    holds_constant = "x* (the adversarial input is data)"

    eps: float = parameter(0.08, "perturbation size ε of the adversarial examples, in pixel units ([0, 1] images)",
                           check_nonnegative)
    clip: tuple | None = parameter(None, "clip adversarial images to LOW,HIGH, e.g. 0,1", check_interval,
                                   parse=_two_numbers)

    def _backward(self, model, x, y, params):
        return adversarial_backward(self, model, x, y, params, self.eps, 0.0, "sign", self.clip)
