"""Linear backpropagation (Guo et al. 2020; papers/linbp-convergence.txt) as a training method."""
from __future__ import annotations

import torch

from ..passes import linbp_backward
from .base import Method, register


@register("linbp")
class LinBP(Method):
    """Backpropagate L with the derivative of every ReLU from the `first`-th on (forward order,
    1-based; `first=1` means all) replaced by the identity; the forward pass is unchanged."""

    def __init__(self, first: int = 1, loss_fn=None):
        super().__init__(loss_fn)
        if int(first) != first or first < 1:
            raise ValueError(f"linbp: first must be an integer ≥ 1, got {first}")
        self.first = int(first)

    def _backward(self, model, x, y, params):
        with linbp_backward(model, self.first):
            main_loss = self.per_sample_loss(model(x), y).mean()
        torch.autograd.backward(main_loss, inputs=params)
        return main_loss.item(), 0.0
