"""Adversarial attacks on classifiers that map [0, 1] images to logits.

In-house (torch; usable inside a training step; `gradient="bp"` or `"linbp"`):
    input_gradient, fgsm, gradient_noise, pgd (L∞, L2; loss "ce" or "kl"), tpgd
From the Adversarial Robustness Toolbox (optional extra `robustbp[attacks]`, imported lazily):
    apgd, square, autoattack, art_pgd
"""
from robustbp.attacks.art_adapter import apgd, art_available, art_classifier, art_pgd, autoattack, square
from robustbp.attacks.gradients import gradient_health, input_gradient
from robustbp.attacks.gradient_attacks import fgsm, gradient_noise, pgd, pgd_checkpoints, tpgd

__all__ = [
    "apgd",
    "art_available",
    "art_classifier",
    "art_pgd",
    "autoattack",
    "fgsm",
    "gradient_health",
    "gradient_noise",
    "input_gradient",
    "pgd",
    "pgd_checkpoints",
    "square",
    "tpgd",
]
