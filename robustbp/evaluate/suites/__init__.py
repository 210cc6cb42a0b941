"""The registry of evaluation suites, in the order they run (Square after the gradient attacks it is compared with).

Adding a suite: one module here that defines `SUITE = Suite(...)`, and one entry below.
"""
from __future__ import annotations

from robustbp.evaluate.suites import apgd, boundary, clean, fgsm, linbp, noise, pgd, spectral, square
from robustbp.evaluate.suites.base import Evaluation, Setting, Suite

REGISTRY: dict[str, Suite] = {
    module.SUITE.name: module.SUITE
    for module in (clean, noise, fgsm, pgd, linbp, square, apgd, boundary, spectral)
}
SUITES = tuple(REGISTRY)


def get(name: str) -> Suite:
    """The registered suite `name`; ValueError naming the registered ones otherwise."""
    if name not in REGISTRY:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "SUITES", "Evaluation", "Setting", "Suite", "get"]
