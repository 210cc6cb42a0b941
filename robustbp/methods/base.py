"""The method protocol: `stats = method.backward(model, x, y)` fills `.grad` like `loss.backward()`.

Conventions shared by every method (see each method's docstring for its formula):
  ℓ_i = loss_fn(z_i, y_i) is the per-sample loss on the logits z_i = f(x_i);
  L = (1/B) Σ_i ℓ_i is the main loss; a per-sample penalty R_i enters as β·(1/B) Σ_i R_i;
  g_i = ∇_{x_i} ℓ_i is the per-sample input gradient.
The gradient of the whole objective is *added* to each trainable parameter's `.grad`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..validation import check_batch, check_logits

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ℓ_i = −log softmax(z_i)[y_i], one value per sample."""
    return F.cross_entropy(logits, labels, reduction="none")


@dataclass(frozen=True)
class StepStats:
    """loss = main_loss + reg_loss, as floats, for one batch; `correct` is how many samples of the
    clean batch the model classified right in the method's own forward pass (no extra pass)."""

    loss: float
    main_loss: float
    reg_loss: float
    correct: int


class Method:
    """Base class: checks the batch, then calls `_backward`, which subclasses implement.

    `loss_fn(logits, labels)` must return one loss per sample, shape (B,);
    the default is cross-entropy.
    """

    name: str = ""
    holds_constant: str = "nothing (the exact gradient of its objective)"
    # The method differentiates through its own gradient: attention then runs on PyTorch's math
    # kernel, since the fused CPU kernel has no double backward.
    differentiates_twice: bool = False

    def __init__(self, loss_fn: LossFn | None = None):
        self.loss_fn = loss_fn or cross_entropy_per_sample

    def backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        params = trainable_parameters(model)
        x, y = check_batch(x, y)
        self._correct = None
        if self.differentiates_twice:
            with sdpa_kernel(SDPBackend.MATH):
                main, reg = self._backward(model, x, y, params)
        else:
            main, reg = self._backward(model, x, y, params)
        return StepStats(loss=main + reg, main_loss=main, reg_loss=reg, correct=self._correct)

    def _backward(self, model, x, y, params) -> tuple[float, float]:
        raise NotImplementedError

    def main_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L = (1/B) Σ_i ℓ_i on the clean batch's logits; also counts the correct predictions."""
        losses = self.per_sample_loss(logits, y)
        self._correct = int((logits.detach().argmax(dim=1) == y).sum())
        return losses.mean()

    def per_sample_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_logits(logits, self.name)
        if logits.shape[1] == 1 and self.loss_fn is cross_entropy_per_sample:
            raise ValueError(
                f"{self.name}: the model returns one logit per sample, so cross-entropy is 0 whatever the weights; "
                f"return one logit per class, or pass a loss_fn made for one output (binary cross-entropy)"
            )
        num_classes = logits.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(
                f"{self.name}: labels must lie in [0, {num_classes}) for a model with {num_classes} outputs, "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
        losses = self.loss_fn(logits, y)
        if losses.shape != (logits.shape[0],):
            raise ValueError(
                f"{self.name}: loss_fn must return one loss per sample, shape ({logits.shape[0]},), "
                f"got {tuple(losses.shape)} (use reduction='none')"
            )
        return losses

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "loss_fn" and not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (none with requires_grad=True)")
    return params


def deliver(params: list, terms) -> None:
    """Add every gradient of one step to `.grad` in ONE autograd call, so each parameter's gradient
    reaches `.grad` once, through autograd's AccumulateGrad: tensor hooks (a user's clipping hook)
    fire once per parameter per step and DistributedDataParallel all-reduces once, as with
    `loss.backward()`. Each term is (tensor, grad): a scalar objective with grad None, or a tensor
    the forward used (a weight, possibly an expression of parameters) with a hand-formed gradient.
    Terms of the same tensor are summed first; terms with grad None on a non-scalar are skipped."""
    totals: dict[int, list] = {}
    for tensor, grad in terms:
        if grad is None:
            if tensor.dim() != 0:
                continue
            grad = torch.ones_like(tensor)
        if not tensor.requires_grad:
            continue
        if id(tensor) in totals:
            totals[id(tensor)][1] = totals[id(tensor)][1] + grad.detach()
        else:
            totals[id(tensor)] = [tensor, grad.detach()]
    if totals:
        tensors, grads = zip(*totals.values())
        torch.autograd.backward(tensors, grads, inputs=params)


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a Method available as `robustbp.methods.get(name, ...)`."""

    def decorate(cls: type[Method]) -> type[Method]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def parameters_of(name: str) -> dict[str, object]:
    """The keyword parameters a method takes and their defaults."""
    signature = inspect.signature(method_class(name).__init__)
    return {
        key: p.default for key, p in signature.parameters.items() if key not in ("self", "loss_fn")
    }


def get(name: str, **kwargs) -> Method:
    """Build a method by name: `get("loss-ibp", beta=0.01, p=1)`."""
    cls = method_class(name)
    accepted = parameters_of(name)
    unknown = sorted(set(kwargs) - set(accepted) - {"loss_fn"})
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted) or 'no parameters'}"
        )
    return cls(**kwargs)
