"""Tangent propagation (Simard et al. 1992) and its fast variant (IBP paper §4).

The tangent vectors of an image are the Lie derivatives of its Gaussian-smoothed version under
five transformations: x shift, y shift, x scale, y scale and rotation.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..passes import Linearization
from dataclasses import dataclass

from ..validation import check_positive
from .base import Method, deliver, parameter, penalty_weight, register
from .ibp import invariant_backward, jacobian_vector_product

TangentFn = Callable[[torch.Tensor], torch.Tensor]


def _gaussian_kernel(sigma: float, dtype, device) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def image_tangents(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """The five Lie-derivative tangents of each image, shape (B, 5, C, H, W).

    With I_σ = G_σ * I (separable Gaussian, zero padding), ∂_u, ∂_v its central differences along
    the width and the height, and (u, v) pixel coordinates centred on the image:
        x shift ∂_u I_σ,  y shift ∂_v I_σ,  x scale u·∂_u I_σ,  y scale v·∂_v I_σ,
        rotation v·∂_u I_σ − u·∂_v I_σ.
    """
    if x.dim() != 4:
        raise ValueError(f"tangent vectors need images of shape (B, C, H, W), got {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    planes = x.reshape(batch * channels, 1, height, width)
    kernel = _gaussian_kernel(sigma, x.dtype, x.device)
    radius = kernel.numel() // 2
    smooth = F.conv2d(planes, kernel.view(1, 1, 1, -1), padding=(0, radius))
    smooth = F.conv2d(smooth, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    difference = torch.tensor([0.5, 0.0, -0.5], dtype=x.dtype, device=x.device)
    d_u = F.conv2d(smooth, difference.view(1, 1, 1, 3), padding=(0, 1))
    d_v = F.conv2d(smooth, difference.view(1, 1, 3, 1), padding=(1, 0))
    u = (torch.arange(width, dtype=x.dtype, device=x.device) - (width - 1) / 2).view(1, 1, 1, width)
    v = (torch.arange(height, dtype=x.dtype, device=x.device) - (height - 1) / 2).view(1, 1, height, 1)
    tangents = torch.stack([d_u, d_v, u * d_u, v * d_v, v * d_u - u * d_v], dim=1)
    return tangents.reshape(batch, channels, 5, height, width).transpose(1, 2)


def _check_tangents(value, name):
    if value is not None and not callable(value):
        raise ValueError(f"{name} must be a function x -> (B, T, *x.shape[1:]), got {value!r}")
    return value


@dataclass(eq=False, repr=False)
class TangentMethod(Method):
    beta: float = penalty_weight(0.01)
    sigma: float = parameter(1.0, "smoothing scale σ of the image tangents, in pixels", check_positive)
    tangents: TangentFn | None = parameter(None, "a function x -> (B, T, ...) of your own tangent vectors",
                                           _check_tangents, parse=None)

    def tangent_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) tangent vectors of the batch, held constant; in x's own precision even under
        autocast (they are data: central differences of the smoothed image, which bfloat16 rounding
        would swamp where the image is smooth)."""
        with torch.autocast(x.device.type, enabled=False):
            tangents = self.tangents(x) if self.tangents is not None else image_tangents(x, self.sigma)
        if tangents.dim() != x.dim() + 1 or tangents.shape[0] != x.shape[0] or tangents.shape[2:] != x.shape[1:]:
            raise ValueError(
                f"{self.name}: tangents must have shape (B, T, {', '.join(map(str, x.shape[1:]))}) "
                f"for x of shape {tuple(x.shape)}, got {tuple(tangents.shape)}"
            )
        return tangents.detach()


@register("tangent-prop")
class TangentProp(TangentMethod):
    """Tangent propagation: L + β·(1/B) Σ_i ½ Σ_t ‖J_z(x_i)·t_i‖², with the exact gradient.

    The T tangents of the batch are stacked into one batch of T·B directions and pushed through
    the linearized network in a single pass (one pass per tangent where the batch does not stay in
    dim 0), with the derivatives of smooth operations as functions of θ (every second derivative
    included; BatchNorm statistics and dropout masks held). `tangents` (optional) maps x to (B, T, ...) user tangents.
    """

    holds_constant = "the tangent vectors; BatchNorm batch statistics and dropout masks; otherwise exact"

    differentiates_twice = True

    def _backward(self, model, x, y, params):
        tangents = self.tangent_vectors(x)
        x = x.detach().requires_grad_(True)
        lin = Linearization.record(model, x)
        main_loss = self.main_loss(lin.logits, y)
        stacked = tangents.transpose(0, 1).reshape(-1, *x.shape[1:])
        jt = jacobian_vector_product(lin, stacked)
        reg_loss = self.beta * 0.5 * jt.pow(2).sum() / x.shape[0]
        deliver(params, [(main_loss + reg_loss, None)])
        return main_loss.item(), reg_loss.item()


@register("fast-tangent-prop")
class FastTangentProp(TangentMethod):
    """Fast Tangent BP (ibp-loss-and-prediction.txt): L + β·(1/B) Σ_i ½ Σ_t (g_i·t_i)², with the
    IBP-style gradient: ∂ℓ/∂z and the derivatives of nonlinear operations held constant, so one linearized
    forward pass of h_i = β Σ_t (g_i·t_i)·t_i, at the cost of Loss IBP."""

    holds_constant = "the tangent vectors, ∂ℓ/∂z and the derivatives of nonlinear operations, as loss-ibp"

    def _backward(self, model, x, y, params):
        tangents = self.tangent_vectors(x)

        def penalty(input_grad, x):
            projections = (tangents * input_grad.unsqueeze(1)).flatten(2).sum(2)
            return self.beta * 0.5 * projections.pow(2).sum(1).mean()

        return invariant_backward(self, model, x, y, params, penalty)
