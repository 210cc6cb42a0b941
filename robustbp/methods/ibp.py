"""Invariant backpropagation (Demyanov et al.) and its relatives.

papers/ibp-invariant-backprop.md (Alg. 1, §7.1) and papers/ibp-loss-and-prediction.txt.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..passes import Linearization, bias_gradient, weight_gradient
from .base import Method, accumulate_grads, check_nonnegative, parameter_grads, register


def invariant_backward(
    method: Method,
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    params: list,
    penalty_of_input_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[float, float]:
    """The three-pass gradient of L + R(g), g_i = ∇_{x_i} ℓ_i, with ∂ℓ/∂z and every activation
    derivative held constant (IBP paper Alg. 1).

    1. forward z = f(x), recording masks, pooling positions and each weight layer's input x_{l-1};
    2. backward from L: the signals dy_l = ∂L/∂y_l at every weight layer and g (no weight
       gradients; the biases' gradients are sums of dy_l, formed here rather than by autograd,
       whose convolution backward costs twice as much when asked for the bias);
    3. linearized forward of h = B·∂R/∂g (no biases, the recorded masks), giving tangents x̃_{l-1};
    then each weight gets dy_lᵀ·(x_{l-1} + x̃_{l-1}): the main-loss and the penalty gradient in
    one product, since both use the same backward signals. Biases get no penalty gradient.
    Why this is the gradient: R depends on θ through g_i = J_iᵀ δ_i, so with δ and the derivatives
    held constant ∇_θ R = ∇_θ Σ_i (δ_i/B)ᵀ J_i(θ) h_i, a bilinear form whose weight gradient is
    the backward signal of δ/B times the forward signal of h.

    When BatchNorm normalizes with the batch's statistics, the penalty uses them held constant:
    the main loss then backpropagates on its own and steps 2–3 run on the frozen network.
    """
    batch = x.shape[0]
    x = x.detach().requires_grad_(True)
    lin = Linearization.record(model, x, capture_weights=True)
    main_loss = method.per_sample_loss(lin.logits, y).mean()
    captured = {id(call.module.weight) for call in lin.tape.weight_calls}
    captured_biases = {
        id(call.module.bias): call.module.bias for call in lin.tape.weight_calls
        if call.module.bias is not None and call.module.bias.requires_grad
    }

    if lin.tape.batch_coupled:
        computed = list(zip(params, parameter_grads(main_loss, params)))
        calls: list = []
        penalty_loss = method.per_sample_loss(lin.frozen_logits(x, weight_calls=calls), y).mean()
        grads = torch.autograd.grad(
            penalty_loss, [x] + [c.output_edge for c in calls], allow_unused=True, materialize_grads=True
        )
        fused = False
    else:
        calls = lin.tape.weight_calls
        others = [p for p in params if id(p) not in captured and id(p) not in captured_biases]
        grads = torch.autograd.grad(
            main_loss, [x] + [c.output_edge for c in calls] + others, allow_unused=True, materialize_grads=True
        )
        computed = list(zip(others, grads[1 + len(calls):]))
        bias_grads: dict[int, torch.Tensor] = {}
        for call, output_grad in zip(calls, grads[1:1 + len(calls)]):
            bias = call.module.bias
            if bias is not None and id(bias) in captured_biases:
                bias_grads[id(bias)] = bias_grads.get(id(bias), 0) + bias_gradient(call, output_grad)
        computed += [(captured_biases[key], grad) for key, grad in bias_grads.items()]
        fused = True

    input_grad = (grads[0] * batch).detach().requires_grad_(True)
    with torch.enable_grad():
        reg_loss = penalty_of_input_grad(input_grad, x.detach())
        (dreg_dg,) = torch.autograd.grad(reg_loss, input_grad)
    tangents: list = []
    with torch.no_grad():
        lin.jvp(dreg_dg * batch, tangent_inputs=tangents)
        weight_grads: dict[int, torch.Tensor] = {}
        for call, output_grad, tangent in zip(calls, grads[1:1 + len(calls)], tangents):
            inputs = call.input.detach() + tangent if fused else tangent
            key = id(call.module.weight)
            weight_grads[key] = weight_grads.get(key, 0) + weight_gradient(call, inputs, output_grad)
    accumulate_grads(computed + [(param, weight_grads.get(id(param))) for param in params])
    return main_loss.item(), reg_loss.item()


def lp_penalty(beta: float, p: int):
    """R = β·(1/B) Σ_i (1/p)·‖g_i‖_p^p."""

    def penalty(input_grad, x):
        per_sample = input_grad.abs().flatten(1).pow(p).sum(1) / p
        return beta * per_sample.mean()

    return penalty


def check_p(name: str, p) -> int:
    if p not in (1, 2):
        raise ValueError(f"{name}: p must be 1 or 2, got {p!r}")
    return int(p)


@register("loss-ibp")
class LossIBP(Method):
    """Loss IBP (Invariant BP): L + β·(1/B) Σ_i (1/p)‖g_i‖_p^p, p ∈ {1, 2}.

    Gradient: the paper's three passes (IBP paper Alg. 1, §7.1; see `invariant_backward`), i.e.
    ∇_θ of the penalty with ∂ℓ_i/∂z_i and every activation derivative held constant; p = 1
    propagates sign(g) through the linearized network, p = 2 propagates g. Biases get no
    penalty gradient. For networks of ReLU, max-pooling and dropout this is the exact gradient
    except for the loss layer's curvature (compare `double-backprop`).
    """

    def __init__(self, beta: float = 0.01, p: int = 1, loss_fn=None):
        super().__init__(loss_fn)
        check_nonnegative(self.name, beta=beta)
        self.beta, self.p = float(beta), check_p(self.name, p)

    def _backward(self, model, x, y, params):
        return invariant_backward(self, model, x, y, params, lp_penalty(self.beta, self.p))


@register("double-backprop")
class DoubleBackprop(Method):
    """Double backpropagation (Drucker & LeCun 1992): the objective of Loss IBP,
    L + β·(1/B) Σ_i (1/p)‖g_i‖_p^p, with its exact gradient by autograd (create_graph), the
    loss layer's curvature ∂²ℓ/∂z² included. BatchNorm statistics are held constant in g."""

    def __init__(self, beta: float = 0.01, p: int = 1, loss_fn=None):
        super().__init__(loss_fn)
        check_nonnegative(self.name, beta=beta)
        self.beta, self.p = float(beta), check_p(self.name, p)

    def _backward(self, model, x, y, params):
        x = x.detach().requires_grad_(True)
        lin = Linearization.record(model, x)
        main_loss = self.per_sample_loss(lin.logits, y).mean()
        penalty_losses = self.per_sample_loss(lin.frozen_logits(x), y)
        (input_grad,) = torch.autograd.grad(penalty_losses.sum(), x, create_graph=True)
        reg_loss = lp_penalty(self.beta, self.p)(input_grad, x)
        torch.autograd.backward(main_loss + reg_loss, inputs=params)
        return main_loss.item(), reg_loss.item()


def jacobian_vector_product(lin: Linearization, penalty_logits: torch.Tensor, x: torch.Tensor, v: torch.Tensor):
    """J·v, differentiable with respect to the parameters, exactly.

    For networks whose nonlinearities are piecewise linear (ReLU, max-pooling, dropout) the
    linearized forward pass is exact and cheap. Otherwise J·v comes from the double-vjp identity
    J·v = ∂/∂u ⟨Jᵀu, v⟩ through autograd, which keeps every second-order term. `v` may stack
    k tangents per sample (rows t·B + i).
    """
    if lin.tape.piecewise_linear:
        return lin.jvp(v)
    batch = x.shape[0]
    repeats = v.shape[0] // batch
    dummy = torch.zeros_like(penalty_logits, requires_grad=True)
    (vjp,) = torch.autograd.grad(penalty_logits, x, dummy, create_graph=True)
    products = [
        torch.autograd.grad(vjp, dummy, v[t * batch:(t + 1) * batch], create_graph=True)[0] for t in range(repeats)
    ]
    return torch.cat(products)


def main_grads_and_input_grad(method, lin, x, y, params) -> tuple[torch.Tensor, list, torch.Tensor]:
    """(L, ∂L/∂θ as (param, grad) pairs, per-sample g) with the penalty's convention for g (batch
    statistics held constant), in one backward pass where possible; the recorded graph is kept."""
    main_loss = method.per_sample_loss(lin.logits, y).mean()
    if lin.tape.batch_coupled:
        main_grads = parameter_grads(main_loss, params, retain_graph=True)
        penalty_losses = method.per_sample_loss(lin.frozen_logits(x), y)
        (input_grad,) = torch.autograd.grad(penalty_losses.sum(), x, retain_graph=True)
        return main_loss, list(zip(params, main_grads)), input_grad
    grads = torch.autograd.grad(main_loss, [x] + params, retain_graph=True, allow_unused=True)
    return main_loss, list(zip(params, grads[1:])), grads[0] * x.shape[0]


@register("prediction-ibp")
class PredictionIBP(Method):
    """Prediction IBP (ibp-loss-and-prediction.txt): L + β·(1/B) Σ_i ½‖J_z(x_i)·v_i‖², with
    v_i = sign(g_i) (`direction="sign"`) or g_i (`direction="grad"`) held constant, and the
    exact gradient of the penalty."""

    def __init__(self, beta: float = 0.01, direction: str = "sign", loss_fn=None):
        super().__init__(loss_fn)
        check_nonnegative(self.name, beta=beta)
        if direction not in ("sign", "grad"):
            raise ValueError(f"prediction-ibp: direction must be 'sign' or 'grad', got {direction!r}")
        self.beta, self.direction = float(beta), direction

    def _backward(self, model, x, y, params):
        x = x.detach().requires_grad_(True)
        lin = Linearization.record(model, x)
        main_loss, main_grads, input_grad = main_grads_and_input_grad(self, lin, x, y, params)
        direction = input_grad.sign() if self.direction == "sign" else input_grad
        jv = jacobian_vector_product(lin, lin.frozen_logits(x), x, direction.detach())
        reg_loss = self.beta * 0.5 * jv.pow(2).flatten(1).sum(1).mean()
        accumulate_grads(main_grads + list(zip(params, parameter_grads(reg_loss, params))))
        return main_loss.item(), reg_loss.item()
