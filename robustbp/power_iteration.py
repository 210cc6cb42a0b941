"""The power iteration for σ_max of each sample's input Jacobian (spectral paper, Alg. 1),
through the forward (J·v, the linearized replay) and backward (Jᵀ·u, autograd) modes."""
from __future__ import annotations

import torch
from torch import nn

from .passes import Linearization


def per_sample_norm(t: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    norms = t.flatten(1).norm(dim=1)
    return norms.view(-1, *([1] * (t.dim() - 1))) if keepdim else norms


def power_iteration(lin: Linearization, logits: torch.Tensor, v: torch.Tensor, n_iter: int,
                    create_graph: bool = False) -> torch.Tensor:
    """Spectral paper Alg. 1, per sample: v ← v/‖v‖; repeat n_iter times: u = J·v (linearized
    forward), u ← u/‖u‖, v = Jᵀ·u (backward of `logits` to `lin.x`). Returns the last Jᵀu, whose
    norm is the estimate σ̂ of σ_max(J); with `create_graph` it is differentiable in the parameters
    (u held constant)."""
    v = v / per_sample_norm(v, keepdim=True)
    for step in range(n_iter):
        with torch.no_grad():
            u = lin.jvp(v)
            u = u / per_sample_norm(u, keepdim=True).clamp_min(1e-30)
        last = step == n_iter - 1
        (v,) = torch.autograd.grad(logits, lin.x, u, retain_graph=True, create_graph=create_graph and last)
    return v


def spectral_norm_estimate(
    model: nn.Module, x: torch.Tensor, n_iter: int = 1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """σ̂ of σ_max(J_i), J_i = ∂z_i/∂x_i, by `power_iteration` from v ~ N(0, I).
    Returns shape (B,), detached."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        lin = Linearization.record(model, x)
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return per_sample_norm(power_iteration(lin, lin.frozen_logits(x), v, n_iter)).detach()
