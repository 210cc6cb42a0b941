"""Linear backpropagation (Guo et al. 2020; papers/linbp-convergence.txt) as a training method,
and the switch `linbp_backward` that the attacks' `gradient="linbp"` uses too."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..operations import RULE_OF
from ..validation import check_integer
from .base import Method, deliver, parameter, register


class _ReLUIdentityBackward(torch.autograd.Function):
    """relu(x) forward, derivative 1 backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class _ReLUIdentityBackwardInPlace(torch.autograd.Function):
    """relu_(x) in place forward, derivative 1 backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        return x.relu_()

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


_RELU_FUNCTIONS = frozenset(f for f, rule in RULE_OF.items() if rule.name == "relu")


class _LinearizedReLUs(TorchFunctionMode):
    """Every ReLU call, however written (nn.ReLU, F.relu, torch.relu, x.relu(), in place), from the
    `first`-th on gets the identity as its derivative; everything else runs untouched."""

    def __init__(self, first: int):
        super().__init__()
        self.first, self.calls = first, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RELU_FUNCTIONS:
            return func(*args, **kwargs)
        self.calls += 1
        if self.calls < self.first:
            return func(*args, **kwargs)
        in_place = func in (F.relu_, torch.relu_, torch.Tensor.relu_) or kwargs.get("inplace") or (
            len(args) > 1 and args[1] is True)
        return (_ReLUIdentityBackwardInPlace if in_place else _ReLUIdentityBackward).apply(args[0])


@contextmanager
def linbp_backward(model: nn.Module, first: int = 1) -> Iterator[None]:
    """LinBP (Guo et al. 2020; Li et al., linbp-convergence.txt §III): inside this context the
    forward pass is unchanged, and in the backward pass the derivative of every ReLU call from the
    `first`-th on (forward order, 1-based) is replaced by the identity. Raises ValueError after a
    forward that applied no ReLU, or fewer than `first`: LinBP would then be plain BP."""
    if int(first) != first or first < 1:
        raise ValueError(f"linbp: first must be an integer ≥ 1 (the first ReLU to linearize), got {first}")
    mode = _LinearizedReLUs(int(first))
    with mode:
        yield
    if mode.calls == 0:
        raise ValueError(
            f"linbp: {type(model).__name__} applies no ReLU, so LinBP would be plain backpropagation; "
            f"use gradient='bp' / the standard method"
        )
    if mode.calls < first:
        raise ValueError(
            f"linbp: first={first}, but {type(model).__name__} applies only {mode.calls} ReLU call(s) per forward"
        )


@register("linbp")
class LinBP(Method):
    """Backpropagate L with the derivative of every ReLU call from the `first`-th on (forward order,
    1-based; `first=1` means all) replaced by the identity; the forward pass is unchanged."""

    holds_constant = "nothing; the backward replaces each linearized ReLU's derivative by 1"

    first: int = parameter(1, "give every ReLU call from this one on (1-based) derivative 1", check_integer, parse=int)

    def _backward(self, model, x, y, params):
        with linbp_backward(model, self.first):
            main_loss = self.main_loss(model(x), y)
        deliver(params, [(main_loss, None)])
        return main_loss.item(), 0.0


def relu_calls(model: nn.Module, x: torch.Tensor) -> int:
    """How many ReLU calls one forward of `model` on `x` applies (no gradients, mode as given)."""
    mode = _LinearizedReLUs(first=1)
    with torch.no_grad(), mode:
        model(x)
    return mode.calls
