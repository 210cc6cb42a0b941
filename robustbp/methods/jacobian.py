"""Jacobian penalties: the Frobenius norm by random projections (Hoffman et al. 2019) and the
exact spectral norm by power iteration (papers/exact-spectral-norm.txt, Alg. 1)."""
from __future__ import annotations

import torch

from ..passes import Linearization
from ..power_iteration import per_sample_norm, power_iteration
from ..validation import check_integer
from .base import Method, deliver, parameter, penalty_weight, register


def _penalty_graph(method, model, x, y):
    """(x requiring grad, the recording, L, logits of the penalty's network)."""
    x = x.detach().requires_grad_(True)
    lin = Linearization.record(model, x)
    main_loss = method.main_loss(lin.logits, y)
    return x, lin, main_loss, lin.frozen_logits(x)


@register("jacobian-frobenius")
class JacobianFrobenius(Method):
    """L + β·(1/B) Σ_i (C/n_proj) Σ_j ‖∇_x(v_j·z_i)‖² (Hoffman et al. 2019, Alg. 1).

    v_j is drawn uniformly on the unit sphere of R^C, independently per sample and projection;
    `n_proj=-1` uses the C basis vectors instead, giving the exact ‖J_z(x_i)‖_F². Exact gradient
    by double backpropagation (BatchNorm statistics and dropout masks held). Draws from torch's
    global generator.
    """

    holds_constant = "the projections v; BatchNorm batch statistics and dropout masks; otherwise exact"

    differentiates_twice = True

    beta: float = penalty_weight(0.01)
    n_proj: int = parameter(1, "random projections estimating the Frobenius norm (-1: exact, C projections)",
                            lambda value, name: check_integer(value, name, 1, also=(-1,)), parse=int)

    def projections(self, logits: torch.Tensor) -> torch.Tensor:
        """(n, B, C) projection vectors, in the logits' dtype. Drawn in at least float32 (under
        bfloat16 autocast the logits are bfloat16; the draws are then the float32 ones, rounded)."""
        batch, classes = logits.shape
        if self.n_proj == -1:
            return torch.eye(classes, dtype=logits.dtype, device=logits.device).unsqueeze(1).expand(classes, batch, classes)
        v = torch.randn(self.n_proj, batch, classes, dtype=torch.promote_types(logits.dtype, torch.float32),
                        device=logits.device)
        return (v / v.norm(dim=2, keepdim=True)).to(logits.dtype)

    def _backward(self, model, x, y, params):
        x, lin, main_loss, logits = _penalty_graph(self, model, x, y)
        directions = self.projections(logits.detach())
        classes = logits.shape[1]
        squared = sum(
            torch.autograd.grad(logits, x, v, create_graph=True)[0].pow(2).sum() for v in directions
        )
        reg_loss = self.beta * (classes / len(directions)) * squared / x.shape[0]
        deliver(params, [(main_loss + reg_loss, None)])
        return main_loss.item(), reg_loss.item()


@register("jacobian-spectral")
class JacobianSpectral(Method):
    """L + β·(1/B) Σ_i σ̂_i, σ̂_i the power-iteration estimate of σ_max(J_z(x_i)) (spectral paper,
    Alg. 1): v ~ N(0, I), normalized per sample; repeat n_iter times: u = J·v (linearized forward:
    no biases, the recorded activation pattern), u ← u/‖u‖, v = Jᵀ·u (backward); σ̂ = ‖Jᵀu‖.
    The gradient is that of ‖Jᵀu‖ with u held constant (double backpropagation through the last
    Jᵀu); J·v is exact whatever the network, since the replay is taken at the recorded point.
    Draws from torch's global generator.
    """

    holds_constant = "u (the power-iteration direction); BatchNorm batch statistics and dropout masks; otherwise exact"

    differentiates_twice = True

    beta: float = penalty_weight(0.01)
    n_iter: int = parameter(1, "power iterations per step", check_integer, parse=int)

    def _backward(self, model, x, y, params):
        x, lin, main_loss, logits = _penalty_graph(self, model, x, y)
        jacobian_t_u = power_iteration(lin, logits, torch.randn_like(x), self.n_iter, create_graph=True)
        reg_loss = self.beta * per_sample_norm(jacobian_t_u).mean()
        deliver(params, [(main_loss + reg_loss, None)])
        return main_loss.item(), reg_loss.item()
