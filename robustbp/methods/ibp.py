"""Invariant backpropagation (Demyanov et al.) and its relatives.

papers/ibp-invariant-backprop.md (Alg. 1, §7.1) and papers/ibp-loss-and-prediction.txt.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..passes import Linearization, bias_gradient, weight_gradient
from .base import Method, choice, deliver, parameter, penalty_weight, register


def invariant_backward(
    method: Method,
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    params: list,
    penalty_of_input_grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[float, float]:
    """The gradient of L + R(g), g_i = ∇_{x_i} ℓ_i, with ∂ℓ/∂z and the derivative of every
    nonlinear operation held at the recorded point (IBP paper Alg. 1).

    Why this is the gradient: R depends on θ through g_i = J_iᵀ δ_i, so with δ and the derivatives
    held constant ∇_θ R = ∇_θ Σ_i (δ_i/B)ᵀ J_i(θ) h_i with h = B·∂R/∂g, a bilinear form: the
    backward signal of δ/B times the forward signal of h through the linearized network.

    Fast path (the paper's three passes), when parameters enter the network only as weights and
    biases of linear, convolution and BatchNorm operations:
    1. forward z = f(x), recording masks, pooling positions and each weight operation's input a_l;
    2. backward from L: the signals dy_l = ∂L/∂y_l at every weight operation and g (no parameter
       gradients; the biases' are sums of dy_l);
    3. linearized forward of h (no biases, the recorded masks), giving tangents ã_l;
    then each weight gets dy_lᵀ·(a_l + ã_l): the main-loss and the penalty gradient in one product.
    Otherwise (a parameter used elsewhere: a LayerScale γ, LayerNorm's affine, a positional
    embedding, attention's in-projection) the penalty's gradient is that of ⟨δ/B, J(θ)·h⟩ by
    autograd through the linearized replay, which keeps every parameter live.

    When BatchNorm normalizes with the batch's statistics, the penalty uses them held constant:
    the main loss then backpropagates on its own and steps 2–3 run on the frozen network.
    Every gradient reaches `.grad` in one autograd call (`deliver`).
    """
    batch = x.shape[0]
    x = x.detach().requires_grad_(True)
    lin = Linearization.record(model, x, capture_weights=True)
    main_loss = method.main_loss(lin.logits, y)
    if not lin.tape.fusable:
        return _invariant_backward_general(method, lin, main_loss, x, y, params, penalty_of_input_grad)

    if lin.tape.batch_coupled:
        calls: list = []
        penalty_loss = method.per_sample_loss(lin.frozen_logits(x, weight_calls=calls), y).mean()
        input_grad, output_grads = backward_signals(penalty_loss, x, calls)
        terms = [(main_loss, None)]
    else:
        calls = lin.tape.weight_calls
        input_grad, output_grads = backward_signals(main_loss, x, calls)
        terms = bias_terms(calls, output_grads)

    input_grad = (input_grad * batch).detach().requires_grad_(True)
    reg_loss, dreg_dg = _penalty_and_direction(penalty_of_input_grad, input_grad, x)
    tangents: list = []
    with torch.no_grad():
        lin.jvp(dreg_dg * batch, tangent_inputs=tangents)
        inputs = tangents if lin.tape.batch_coupled else [c.checked_input() + t for c, t in zip(calls, tangents)]
        terms += weight_terms(calls, output_grads, inputs)
    deliver(params, terms)
    return main_loss.item(), reg_loss.item()


def backward_signals(loss: torch.Tensor, x: torch.Tensor, calls: list, retain_graph: bool = False):
    """One backward of `loss` to x and to the output of every recorded weight operation in `calls`,
    asking autograd for no parameter gradient: (∂loss/∂x, [∂loss/∂y_l])."""
    grads = torch.autograd.grad(loss, [x] + [c.output_edge for c in calls], materialize_grads=True,
                                retain_graph=retain_graph)
    return grads[0], grads[1:]


def bias_terms(calls: list, output_grads) -> list:
    """(bias, Σ dy_l) for every call with a bias: the bias gradients, to `deliver`."""
    return [(call.bias, bias_gradient(call, dy)) for call, dy in zip(calls, output_grads) if call.bias is not None]


def weight_terms(calls: list, output_grads, inputs) -> list:
    """(weight, dy_lᵀ·inputs_l) for every call whose weight is trained: the weight gradients, to `deliver`."""
    with torch.no_grad():
        return [(call.weight, weight_gradient(call, a, dy)) for call, dy, a in zip(calls, output_grads, inputs)
                if call.weight is not None and call.weight.requires_grad]


def main_loss_terms(lin: Linearization, main_loss: torch.Tensor, x: torch.Tensor, retain_graph: bool = False,
                    scale: float = 1.0):
    """(∂L/∂x, the terms that hand every parameter `scale` × its main-loss gradient) from ONE backward pass.
    When the tape is fusable and not batch-coupled, the weight gradients are formed by hand as
    dy_lᵀ·a_l from the backward signals, so a method that needs both g and ∂L/∂θ backpropagates
    L once and still delivers every gradient in one autograd call; otherwise the terms are
    [(L, None)] and g comes from a backward to x alone."""
    if lin.tape.fusable and not lin.tape.batch_coupled and lin.tape.weight_calls:
        calls = lin.tape.weight_calls
        input_grad, output_grads = backward_signals(main_loss, x, calls, retain_graph)
        output_grads = [scale * dy for dy in output_grads]
        return input_grad, bias_terms(calls, output_grads) + weight_terms(
            calls, output_grads, [c.checked_input() for c in calls])
    (input_grad,) = torch.autograd.grad(main_loss, x, retain_graph=True)
    return input_grad, [(scale * main_loss, None)]


def _penalty_and_direction(penalty_of_input_grad, input_grad, x):
    with torch.enable_grad():
        reg_loss = penalty_of_input_grad(input_grad, x.detach())
        (dreg_dg,) = torch.autograd.grad(reg_loss, input_grad)
    return reg_loss, dreg_dg


def _invariant_backward_general(method, lin, main_loss, x, y, params, penalty_of_input_grad):
    """The general route of `invariant_backward`: L + ⟨δ/B, J(θ)·h⟩ with δ and h held, one backward."""
    batch = x.shape[0]
    penalty_logits = lin.frozen_logits(x)
    penalty_loss = method.per_sample_loss(penalty_logits, y).mean()
    dloss_dlogits, input_grad = torch.autograd.grad(penalty_loss, [penalty_logits, x], retain_graph=True)
    input_grad = (input_grad * batch).detach().requires_grad_(True)
    reg_loss, dreg_dg = _penalty_and_direction(penalty_of_input_grad, input_grad, x)
    penalty_surrogate = (dloss_dlogits.detach() * lin.jvp(dreg_dg * batch)).sum()
    deliver(params, [(main_loss + penalty_surrogate, None)])
    return main_loss.item(), reg_loss.item()


def lp_penalty(beta: float, p: int):
    """R = β·(1/B) Σ_i (1/p)·‖g_i‖_p^p."""

    def penalty(input_grad, x):
        per_sample = input_grad.abs().flatten(1).pow(p).sum(1) / p
        return beta * per_sample.mean()

    return penalty


@register("loss-ibp")
class LossIBP(Method):
    """Loss IBP (Invariant BP): L + β·(1/B) Σ_i (1/p)‖g_i‖_p^p, p ∈ {1, 2}.

    Gradient: the paper's three passes (IBP paper Alg. 1, §7.1; see `invariant_backward`), i.e.
    ∇_θ of the penalty with ∂ℓ_i/∂z_i and the derivative of every nonlinear operation (activations,
    LayerNorm's and GroupNorm's normalization, attention's softmax) held at the recorded point,
    parameters live; BatchNorm batch statistics and dropout masks held too; p = 1
    propagates sign(g) through the linearized network, p = 2 propagates g. Biases get no
    penalty gradient. For networks of ReLU, max-pooling and dropout this is the exact gradient
    except for the loss layer's curvature (compare `double-backprop`).
    """

    holds_constant = "∂ℓ/∂z, the derivative of every nonlinear operation at the recorded point (parameters inside an operation live), BatchNorm batch statistics, dropout masks"

    beta: float = penalty_weight(0.01)
    p: int = parameter(1, "norm of the input-gradient penalty: 1 (propagates sign(g)) or 2", choice(1, 2),
                       parse=int, bench=(2,))

    def _backward(self, model, x, y, params):
        return invariant_backward(self, model, x, y, params, lp_penalty(self.beta, self.p))


@register("double-backprop")
class DoubleBackprop(Method):
    """Double backpropagation (Drucker & LeCun 1992): the objective of Loss IBP,
    L + β·(1/B) Σ_i (1/p)‖g_i‖_p^p, with its exact gradient by autograd (create_graph), the
    loss layer's curvature ∂²ℓ/∂z² and every second derivative included. Holds constant only the
    BatchNorm batch statistics in g (so that the penalty is per sample) and the dropout masks."""

    holds_constant = "BatchNorm batch statistics and dropout masks in g; otherwise exact (every second derivative)"

    differentiates_twice = True

    beta: float = penalty_weight(0.01)
    p: int = parameter(1, "norm of the input-gradient penalty: 1 or 2", choice(1, 2), parse=int)

    def _backward(self, model, x, y, params):
        x = x.detach().requires_grad_(True)
        lin = Linearization.record(model, x)
        main_loss = self.main_loss(lin.logits, y)
        penalty_losses = self.per_sample_loss(lin.frozen_logits(x), y)
        (input_grad,) = torch.autograd.grad(penalty_losses.sum(), x, create_graph=True)
        reg_loss = lp_penalty(self.beta, self.p)(input_grad, x)
        deliver(params, [(main_loss + reg_loss, None)])
        return main_loss.item(), reg_loss.item()


def jacobian_vector_product(lin: Linearization, v: torch.Tensor) -> torch.Tensor:
    """J·v, differentiable with respect to the parameters exactly: the linearized replay with the
    derivatives of smooth operations taken as functions of θ (every second-order term kept). For
    piecewise-linear networks (ReLU, max-pooling, dropout) that is the plain replay, and cheap.
    `v` may stack k tangents per sample (rows t·B + i)."""
    return lin.jvp(v, exact=not lin.tape.piecewise_linear)


def penalty_input_grad(method, lin, x, y) -> torch.Tensor:
    """Per-sample g_i = ∇_{x_i} ℓ_i on the penalty's network (batch statistics held constant),
    by a backward to x alone (no parameter gradients); the recorded graph is kept."""
    penalty_losses = method.per_sample_loss(lin.frozen_logits(x), y)
    (input_grad,) = torch.autograd.grad(penalty_losses.sum(), x, retain_graph=True)
    return input_grad


@register("prediction-ibp")
class PredictionIBP(Method):
    """Prediction IBP (ibp-loss-and-prediction.txt): L + β·(1/B) Σ_i ½‖J_z(x_i)·v_i‖², with
    v_i = sign(g_i) (`direction="sign"`) or g_i (`direction="grad"`) held constant, and the
    exact gradient of the penalty (every second derivative included; BatchNorm statistics and
    dropout masks held)."""

    holds_constant = "v = sign(g) or g; BatchNorm batch statistics and dropout masks; otherwise exact"

    differentiates_twice = True

    beta: float = penalty_weight(0.01)
    direction: str = parameter("sign", "direction v of the Jacobian penalty: sign(g) or g itself",
                               choice("sign", "grad"), parse=str)

    def _backward(self, model, x, y, params):
        x = x.detach().requires_grad_(True)
        lin = Linearization.record(model, x, capture_weights=True)
        main_loss = self.main_loss(lin.logits, y)
        if lin.tape.batch_coupled:
            input_grad, terms = penalty_input_grad(self, lin, x, y), [(main_loss, None)]
        else:
            input_grad, terms = main_loss_terms(lin, main_loss, x, retain_graph=True)
            input_grad = input_grad * x.shape[0]
        direction = input_grad.sign() if self.direction == "sign" else input_grad
        jv = jacobian_vector_product(lin, direction.detach())
        reg_loss = self.beta * 0.5 * jv.pow(2).flatten(1).sum(1).mean()
        deliver(params, terms + [(reg_loss, None)])
        return main_loss.item(), reg_loss.item()
