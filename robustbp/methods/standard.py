"""Standard backpropagation and the penalties on the weights alone."""
from __future__ import annotations

import torch
from torch import nn

from dataclasses import dataclass, field

from ..validation import check_integer
from .base import Method, deliver, parameter, penalty_weight, register


@register("standard")
class Standard(Method):
    """Plain backpropagation of L = (1/B) Σ_i ℓ_i."""

    def _backward(self, model, x, y, params):
        main_loss = self.main_loss(model(x), y)
        deliver(params, [(main_loss, None)])
        return main_loss.item(), 0.0


def layer_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights of the Linear and convolution layers, by name ("fc1.weight"): no
    biases, no normalization layers. A parametrized or pruned weight is the tensor the layer uses
    (weight-norm, spectral-norm and pruning masks included), differentiable in its parameters."""
    return {
        f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight.requires_grad
    }


@dataclass(eq=False, repr=False)
class WeightPenalty(Method):
    """L + β·R(W), where R depends on the layer weights only (no batch average)."""

    beta: float = penalty_weight(1e-4)

    def weight_penalty(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _backward(self, model, x, y, params):
        main_loss = self.main_loss(model(x), y)
        weights = layer_weights(model)
        with torch.autocast(x.device.type, enabled=False):  # weights alone, cheap: in their own precision
            reg_loss = self.beta * self.weight_penalty(weights) if weights else main_loss.new_zeros(())
        deliver(params, [(main_loss + reg_loss, None)])
        return main_loss.item(), reg_loss.item()


@register("weight-decay")
class WeightDecay(WeightPenalty):
    """R = Σ_l ‖W_l‖², over the weights of Linear and convolution layers (spectral paper, baseline "L2")."""

    def weight_penalty(self, weights):
        return sum(w.pow(2).sum() for w in weights.values())


@register("spectral-bound")
class SpectralBound(WeightPenalty):
    """R = Σ_l σ_max(W_l)² (Yoshida & Miyato 2017; the spectral paper's "spectral bound" baseline).

    σ_max by one power iteration per step with a persistent vector per layer; a convolution kernel
    is reshaped to (C_out, C_in·k·k). With u, v the current singular-vector estimates (held
    constant), σ = uᵀ W v and ∂σ/∂W = u vᵀ. Not averaged over the batch.
    """

    holds_constant = "the singular-vector estimates u, v of each weight"

    n_iter: int = parameter(1, "power iterations per step", check_integer, parse=int)
    _left_vectors: dict = field(default_factory=dict, init=False)  # weight name ("fc1.weight") -> u

    def weight_penalty(self, weights):
        return sum(self.largest_singular_value(name, w) ** 2 for name, w in weights.items())

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The persistent left singular vectors, by the weight's name (for checkpoints)."""
        return {name: u.clone() for name, u in self._left_vectors.items()}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        weights = layer_weights(model)
        unknown = sorted(set(state) - set(weights))
        if unknown:
            raise ValueError(f"spectral-bound: saved vectors for weights the model does not have: {unknown}")
        self._left_vectors = {name: u.to(weights[name].device) for name, u in state.items()}

    def largest_singular_value(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        matrix = weight.reshape(weight.shape[0], -1)
        with torch.no_grad():
            u = self._left_vectors.get(name)
            if u is None or u.shape[0] != matrix.shape[0]:
                u = torch.nn.functional.normalize(torch.randn_like(matrix[:, 0]), dim=0)
            for _ in range(self.n_iter):
                v = torch.nn.functional.normalize(matrix.T @ u, dim=0)
                u = torch.nn.functional.normalize(matrix @ v, dim=0)
            self._left_vectors[name] = u
        return u @ matrix @ v
