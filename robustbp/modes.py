"""Leave a model as it was found: its train/eval flags (every submodule's) and its parameters' gradients."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def preserved_mode(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit, whatever happened inside."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode inside the block and restore each submodule's previous flag after."""
    with preserved_mode(model):
        model.eval()
        yield


@contextlib.contextmanager
def preserved_parameter_grads(model: nn.Module) -> Iterator[None]:
    """Freeze parameters (requires_grad=False) inside the block and give back their `.grad` and flags.

    For code we do not control (the attack library calls `model.zero_grad()` and `loss.backward()`),
    so that an evaluation neither wipes nor adds to gradients a training loop has accumulated.
    """
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
