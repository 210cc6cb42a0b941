"""Standard backpropagation and the penalties on the weights alone."""
from __future__ import annotations

import torch
from torch import nn

from .base import Method, check_nonnegative, register


@register("standard")
class Standard(Method):
    """Plain backpropagation of L = (1/B) Σ_i ℓ_i."""

    def _backward(self, model, x, y, params):
        main_loss = self.per_sample_loss(model(x), y).mean()
        torch.autograd.backward(main_loss, inputs=params)
        return main_loss.item(), 0.0


def layer_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weights of the Linear and Conv2d layers: no biases, no normalization layers."""
    return [
        m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad
    ]


class WeightPenalty(Method):
    """L + β·R(W), where R depends on the layer weights only (no batch average)."""

    def __init__(self, beta: float = 1e-4, loss_fn=None):
        super().__init__(loss_fn)
        check_nonnegative(self.name, beta=beta)
        self.beta = float(beta)

    def weight_penalty(self, weights: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _backward(self, model, x, y, params):
        main_loss = self.per_sample_loss(model(x), y).mean()
        weights = layer_weights(model)
        reg_loss = self.beta * self.weight_penalty(weights) if weights else main_loss.new_zeros(())
        torch.autograd.backward(main_loss + reg_loss, inputs=params)
        return main_loss.item(), reg_loss.item()


@register("weight-decay")
class WeightDecay(WeightPenalty):
    """R = Σ_l ‖W_l‖², over the weights of Linear and Conv2d layers (spectral paper, baseline "L2")."""

    def weight_penalty(self, weights):
        return sum(w.pow(2).sum() for w in weights)


@register("spectral-bound")
class SpectralBound(WeightPenalty):
    """R = Σ_l σ_max(W_l)² (Yoshida & Miyato 2017; the spectral paper's "spectral bound" baseline).

    σ_max by one power iteration per step with a persistent vector per layer; a convolution kernel
    is reshaped to (C_out, C_in·k·k). With u, v the current singular-vector estimates (held
    constant), σ = uᵀ W v and ∂σ/∂W = u vᵀ. Not averaged over the batch.
    """

    def __init__(self, beta: float = 1e-4, n_iter: int = 1, loss_fn=None):
        super().__init__(beta, loss_fn)
        if int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"spectral-bound: n_iter must be an integer ≥ 1, got {n_iter}")
        self.n_iter = int(n_iter)
        self._left_vectors: dict[int, torch.Tensor] = {}  # id(weight) -> u

    def weight_penalty(self, weights):
        return sum(self.largest_singular_value(w) ** 2 for w in weights)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The persistent left singular vectors, by the weight's parameter name (for checkpoints)."""
        return {name: self._left_vectors[id(p)].clone() for name, p in model.named_parameters()
                if id(p) in self._left_vectors}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        parameters = dict(model.named_parameters())
        unknown = sorted(set(state) - set(parameters))
        if unknown:
            raise ValueError(f"spectral-bound: saved vectors for parameters the model does not have: {unknown}")
        self._left_vectors = {id(parameters[name]): u.to(parameters[name].device) for name, u in state.items()}

    def largest_singular_value(self, weight: torch.Tensor) -> torch.Tensor:
        matrix = weight.reshape(weight.shape[0], -1)
        with torch.no_grad():
            u = self._left_vectors.get(id(weight))
            if u is None or u.shape[0] != matrix.shape[0]:
                u = torch.nn.functional.normalize(torch.randn_like(matrix[:, 0]), dim=0)
            for _ in range(self.n_iter):
                v = torch.nn.functional.normalize(matrix.T @ u, dim=0)
                u = torch.nn.functional.normalize(matrix @ v, dim=0)
            self._left_vectors[id(weight)] = u
        return u @ matrix @ v
