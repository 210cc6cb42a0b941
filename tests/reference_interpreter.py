"""The previous, interpreter-based reference: kept only to cross-check tests/reference.py
(test_any_model.test_reference_*) on plain module-style networks. It forms the logits, the
Jacobians and the held input gradient in its own way; the methods' formulas on top of them are
reference.py's.

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

from . import reference
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


class Reference(reference.Reference):
    """One batch, one network, through this interpreter: the logits, the Jacobians (dense, by
    torch.autograd.functional.jacobian) and Loss IBP's held input gradient (J_iᵀ δ_i from them)
    are formed here; each method's formula on top of them is tests/reference.py's, so the cross-
    check tests the machinery of the two references."""

    def logits(self, x=None, **flags) -> torch.Tensor:
        ctx = Context(masks=self.masks, **flags)
        return run(self.model, self.x if x is None else x, ctx)

    def jacobians(self, **flags) -> torch.Tensor:
        """(B, C, D): the per-sample Jacobians J_i = ∂z_i/∂x_i, differentiable in θ."""
        full = torch.autograd.functional.jacobian(
            lambda inp: self.logits(inp, **flags), self.x, create_graph=True
        )
        index = torch.arange(self.batch)
        return full.flatten(3)[index, :, index, :]

    def _logits_and_jacobians(self, **flags):
        return self.logits(**flags), self.jacobians(**flags)

    def held_input_grads(self):
        """g_i = J_iᵀ δ_i with δ_i = ∂ℓ_i/∂z_i and activation derivatives held constant."""
        logits = self.logits(freeze_derivatives=True, freeze_statistics=True)
        delta = (F.softmax(logits, 1) - F.one_hot(self.y, logits.shape[1]).to(logits.dtype)).detach()
        jac = self.jacobians(freeze_derivatives=True, freeze_statistics=True)
        return torch.einsum("bcd,bc->bd", jac, delta)
