"""The previous, interpreter-based reference: kept only to cross-check tests/reference.py
(test_any_model.test_reference_*) on plain module-style networks.

Nothing here uses robustbp's passes. The test networks are nn.Modules, but the reference
evaluates them with its own functional interpreter, so that "held constant" can be written
with autograd alone:
  - an activation derivative held constant:  f(x̄) + (x − x̄)·f'(x̄), x̄ = x.detach()
    (same value, same first derivative in x, no dependence of the derivative on θ);
  - BatchNorm statistics held constant: the mean and variance detached;
  - LinBP's ReLU: x + (relu(x) − x).detach() (value relu(x), derivative 1).
Jacobians are formed densely with torch.autograd.functional.jacobian(create_graph=True).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from robustbp.layers import Normalize

from .reference import Residual


@dataclass
class Context:
    freeze_derivatives: bool = False  # activation derivatives held constant
    freeze_statistics: bool = False  # BatchNorm batch statistics held constant
    linbp_first: int | None = None
    masks: list = field(default_factory=list)  # dropout masks, drawn once, reused by later passes
    mask_index: int = 0
    relu_count: int = 0


def _smooth(fn, derivative, h, ctx):
    if not ctx.freeze_derivatives:
        return fn(h)
    point = h.detach()
    return fn(point) + (h - point) * derivative(point)


def run(module: nn.Module, h: torch.Tensor, ctx: Context) -> torch.Tensor:
    if isinstance(module, nn.Sequential):
        for child in module:
            h = run(child, h, ctx)
        return h
    if isinstance(module, Residual):
        return h + run(module.body, h, ctx)
    if isinstance(module, Normalize):
        return (h - module.mean) / module.std
    if isinstance(module, nn.Linear):
        return F.linear(h, module.weight, module.bias)
    if isinstance(module, nn.Conv2d):
        return F.conv2d(h, module.weight, module.bias, module.stride, module.padding)
    if isinstance(module, nn.ReLU):
        ctx.relu_count += 1
        if ctx.linbp_first is not None and ctx.relu_count >= ctx.linbp_first:
            return h + (F.relu(h) - h).detach()
        return F.relu(h)
    if isinstance(module, nn.LeakyReLU):
        return F.leaky_relu(h, module.negative_slope)
    if isinstance(module, nn.Tanh):
        return _smooth(torch.tanh, lambda t: 1 - torch.tanh(t) ** 2, h, ctx)
    if isinstance(module, nn.Sigmoid):
        return _smooth(torch.sigmoid, lambda t: torch.sigmoid(t) * (1 - torch.sigmoid(t)), h, ctx)
    if isinstance(module, nn.Softplus):
        return _smooth(F.softplus, torch.sigmoid, h, ctx)
    if isinstance(module, nn.MaxPool2d):
        return F.max_pool2d(h, module.kernel_size, module.stride, module.padding)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return F.adaptive_avg_pool2d(h, module.output_size)
    if isinstance(module, nn.AvgPool2d):
        return F.avg_pool2d(h, module.kernel_size, module.stride)
    if isinstance(module, nn.Flatten):
        return h.flatten(1)
    if isinstance(module, nn.Dropout):
        if not module.training:
            return h
        if ctx.mask_index == len(ctx.masks):
            keep = 1 - module.p
            ctx.masks.append(torch.empty_like(h).bernoulli_(keep).div_(keep))
        mask = ctx.masks[ctx.mask_index]
        ctx.mask_index += 1
        return h * mask
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        dims = [0] + list(range(2, h.dim()))
        shape = [1, -1] + [1] * (h.dim() - 2)
        if module.training:
            mean, var = h.mean(dims), h.var(dims, unbiased=False)
            if ctx.freeze_statistics:
                mean, var = mean.detach(), var.detach()
        else:
            mean, var = module.running_mean, module.running_var
        out = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + module.eps)
        return out * module.weight.view(shape) + module.bias.view(shape)
    raise TypeError(f"reference interpreter: no rule for {type(module).__name__}")


class Reference:
    """One batch, one network: the definitions of every method, by plain autograd."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.y = model, y
        self.x = x.detach().clone().requires_grad_(True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.batch = x.shape[0]
        self.masks: list = []

    def logits(self, x=None, **flags) -> torch.Tensor:
        ctx = Context(masks=self.masks, **flags)
        return run(self.model, self.x if x is None else x, ctx)

    def per_sample_loss(self, logits):
        return F.cross_entropy(logits, self.y, reduction="none")

    def main_loss(self):
        return self.per_sample_loss(self.logits()).mean()

    def jacobians(self, **flags) -> torch.Tensor:
        """(B, C, D): the per-sample Jacobians J_i = ∂z_i/∂x_i, differentiable in θ."""
        full = torch.autograd.functional.jacobian(
            lambda inp: self.logits(inp, **flags), self.x, create_graph=True
        )
        index = torch.arange(self.batch)
        return full.flatten(3)[index, :, index, :]

    def grad(self, objective) -> list[torch.Tensor]:
        grads = torch.autograd.grad(objective, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    # ---- the definitions ----
    def held_input_grads(self):
        """g_i = J_iᵀ δ_i with δ_i = ∂ℓ_i/∂z_i and activation derivatives held constant."""
        logits = self.logits(freeze_derivatives=True, freeze_statistics=True)
        delta = (F.softmax(logits, 1) - F.one_hot(self.y, logits.shape[1]).to(logits.dtype)).detach()
        jac = self.jacobians(freeze_derivatives=True, freeze_statistics=True)
        return torch.einsum("bcd,bc->bd", jac, delta)

    def exact_input_grads(self):
        """g_i = ∇_{x_i} ℓ_i with BatchNorm statistics held constant (exact otherwise)."""
        losses = self.per_sample_loss(self.logits(freeze_statistics=True))
        return torch.autograd.grad(losses.sum(), self.x, create_graph=True)[0].flatten(1)

    @staticmethod
    def lp(g, p):
        return (g.abs() ** p).sum(1) / p

    def loss_ibp(self, beta, p):
        return self.grad(self.main_loss() + beta * self.lp(self.held_input_grads(), p).mean())

    def double_backprop(self, beta, p):
        return self.grad(self.main_loss() + beta * self.lp(self.exact_input_grads(), p).mean())

    def curvature_term(self, beta, p):
        """∇_θ of the penalty through δ alone, the Jacobian held constant: what double
        backpropagation adds to Loss IBP's gradient for piecewise-linear networks."""
        jac = self.jacobians(freeze_statistics=True).detach()
        logits = self.logits(freeze_statistics=True)
        delta = F.softmax(logits, 1) - F.one_hot(self.y, logits.shape[1]).to(logits.dtype)
        g = torch.einsum("bcd,bc->bd", jac, delta)
        return self.grad(beta * self.lp(g, p).mean())

    def prediction_ibp(self, beta, direction):
        g = self.exact_input_grads().detach()
        v = g.sign() if direction == "sign" else g
        jac = self.jacobians(freeze_statistics=True)
        jv = torch.einsum("bcd,bd->bc", jac, v)
        return self.grad(self.main_loss() + beta * 0.5 * (jv ** 2).sum(1).mean())

    def tangent_prop(self, beta, tangents):
        jac = self.jacobians(freeze_statistics=True)
        jt = torch.einsum("bcd,btd->btc", jac, tangents.flatten(2))
        return self.grad(self.main_loss() + beta * 0.5 * (jt ** 2).sum((1, 2)).mean())

    def fast_tangent_prop(self, beta, tangents):
        g = self.held_input_grads()
        projections = torch.einsum("bd,btd->bt", g, tangents.flatten(2))
        return self.grad(self.main_loss() + beta * 0.5 * (projections ** 2).sum(1).mean())

    def jacobian_frobenius(self, beta, projections):
        """projections: (n, B, C)."""
        jac = self.jacobians(freeze_statistics=True)
        classes = jac.shape[1]
        jtv = torch.einsum("bcd,nbc->nbd", jac, projections)
        penalty = (classes / projections.shape[0]) * (jtv ** 2).sum((0, 2))
        return self.grad(self.main_loss() + beta * penalty.mean())

    def jacobian_spectral(self, beta, v0, n_iter):
        jac = self.jacobians(freeze_statistics=True)
        v = v0.flatten(1) / v0.flatten(1).norm(dim=1, keepdim=True)
        for _ in range(n_iter):
            u = torch.einsum("bcd,bd->bc", jac.detach(), v.detach())
            u = u / u.norm(dim=1, keepdim=True)
            v = torch.einsum("bcd,bc->bd", jac, u)
        return self.grad(self.main_loss() + beta * v.norm(dim=1).mean())

    def adversarial(self, eps, alpha, norm):
        """Through the model's own forward: nn.Dropout then draws its masks as in training."""
        clean_losses = self.per_sample_loss(self.model(self.x))
        g = torch.autograd.grad(clean_losses.sum(), self.x, retain_graph=True)[0]
        step = g.sign() if norm == "sign" else g
        x_adv = (self.x + eps * step).detach()
        clean = clean_losses.mean()
        adversarial = self.per_sample_loss(self.model(x_adv)).mean()
        return self.grad(alpha * clean + (1 - alpha) * adversarial)

    def linbp(self, first):
        return self.grad(self.per_sample_loss(self.logits(linbp_first=first)).mean())


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    got_flat = torch.cat([g.flatten() for g in got])
    want_flat = torch.cat([w.flatten() for w in want])
    return float((got_flat - want_flat).norm() / want_flat.norm().clamp_min(1e-300))
