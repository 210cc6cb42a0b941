"""Leave a model as it was found: its train/eval flags (every submodule's), its parameters' gradients,
BatchNorm's running statistics."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
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


@contextlib.contextmanager
def preserved_running_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics (and batch counts) as they were before the block: a second
    forward in one training step (adversarial training's pass at x*) does not move them again."""
    saved = [(buffer, buffer.clone()) for module in model.modules()
             if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
             for buffer in (module.running_mean, module.running_var, module.num_batches_tracked) if buffer is not None]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
