"""The linearized network: record a forward pass, then replay it linearly in forward mode.

The methods combine up to four passes through a network f: forward (z = f(x)),
backward (Jᵀ·u, by autograd), linearized forward (J·h) and the weight gradients that follow.
The linearized forward is the network with its biases removed and every nonlinearity replaced
by multiplication with its derivative at the recorded forward pass (IBP paper §7.1):

    Linear / Conv2d     h ↦ W·h                     (no bias)
    ReLU, LeakyReLU     h ↦ f'(x) ⊙ h              (the forward pass's mask)
    Tanh, Sigmoid       h ↦ f'(x) ⊙ h              (derivative at the forward point)
    MaxPool2d           h ↦ h[argmax positions]     (the forward pass's pooling positions)
    Dropout             h ↦ mask ⊙ h               (the forward pass's dropout mask)
    BatchNorm           h ↦ γ/√(σ²+ε) ⊙ h          (batch statistics held constant)
    Normalize           h ↦ h / std
    AvgPool, AdaptiveAvgPool, Flatten, Identity: themselves (already linear, no bias)

Residual additions and other linear operations written in a model's `forward` need no rule.
A parameter-free module without a rule falls back to `torch.func.jvp` at its recorded input
(the same linear map, computed generally); one with parameters raises `UnsupportedModule`.
Nonlinear operations called functionally inside `forward` (F.relu, torch.tanh) are invisible
to module hooks; `Linearization.jvp` checks on a model's first replay that it is linear and raises
`NotLinearizable` otherwise.

The recording forward also captures, for every weight layer (Linear, Conv2d, BatchNorm), the
input it saw and an autograd edge to its output, so that weight gradients can be formed as
(backward signal at the output) ⊗ (input or tangent), the IBP paper's d̃y_{i-1}ᵀ·dy_i.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .layers import Normalize

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d, *_BATCH_NORMS)
_ALREADY_LINEAR = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.Unflatten)
_PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.Dropout)
_SMOOTH = (nn.Tanh, nn.Sigmoid)
KNOWN_MODULES = (*_WEIGHT_LAYERS, *_ALREADY_LINEAR, *_PIECEWISE_LINEAR, *_SMOOTH, Normalize)


class UnsupportedModule(TypeError):
    """A module with parameters that the linearized pass has no rule for."""


class NotLinearizable(RuntimeError):
    """The model's forward applies nonlinear operations outside of modules."""


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if next(m.children(), None) is None]


@contextmanager
def patched_forwards(model: nn.Module, make_forward: Callable[[nn.Module, Callable], Callable | None]):
    """Temporarily replace each leaf module's forward by `make_forward(module, original)`.

    `make_forward` returns None to leave a module alone. The originals are restored on exit,
    whatever happens inside.
    """
    replaced = []
    try:
        for module in leaf_modules(model):
            had_instance_forward = "forward" in module.__dict__
            original = module.forward
            new_forward = make_forward(module, original)
            if new_forward is not None:
                replaced.append((module, had_instance_forward, original))
                module.forward = new_forward
        yield
    finally:
        for module, had_instance_forward, original in replaced:
            if had_instance_forward:
                module.forward = original
            else:
                del module.forward


def _uses_batch_statistics(bn: nn.Module) -> bool:
    return bn.training or not bn.track_running_stats


def _channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-channel vector (C,) to broadcast against `like` (N, C, ...)."""
    return t.reshape(1, -1, *([1] * (like.dim() - 2)))


@dataclass
class WeightCall:
    """One call of a weight layer in the recorded forward pass.

    `input` is what the layer multiplied its weight with: the layer input for Linear/Conv2d,
    the normalized input (x − μ)/√(σ²+ε) for BatchNorm (whose weight is γ).
    """

    module: nn.Module
    input: torch.Tensor
    output_edge: object  # torch.autograd.graph.GradientEdge of the layer's output


@dataclass
class Tape:
    """What one recorded forward pass left behind, per module, in call order."""

    batch_size: int
    records: dict = field(default_factory=lambda: defaultdict(list))
    weight_calls: list[WeightCall] = field(default_factory=list)
    batch_coupled: bool = False  # some BatchNorm normalized with the batch's own statistics
    piecewise_linear: bool = True  # every nonlinearity's derivative is locally constant

    def reader(self) -> Callable[[nn.Module], object]:
        """For one replay of the forward pass: module -> its next record, in call order."""
        calls: dict = defaultdict(int)

        def next_record(module: nn.Module):
            index = calls[module]
            calls[module] += 1
            return self.records[module][index]

        return next_record


def _elementwise(h: torch.Tensor, batch: int, rule) -> torch.Tensor:
    """Apply rule(stacked) to h of shape (k·B, ...) viewed as (k, B, ...), so that a per-sample
    record of shape (B, ...) broadcasts over the k stacked tangents without being copied."""
    return rule(h.view(-1, batch, *h.shape[1:])).flatten(0, 1)


def _record_forward(tape: Tape, capture_weights: bool):
    """The recording forward: ordinary values, plus what the linearized pass will need."""

    def make(module: nn.Module, original: Callable):
        records = tape.records[module]

        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return _capturing_weight_forward(module, original, tape.weight_calls) if capture_weights else None

        if isinstance(module, _BATCH_NORMS):

            def batch_norm_forward(inp):
                dims = [0] + list(range(2, inp.dim()))
                if _uses_batch_statistics(module):
                    tape.batch_coupled = True
                    var, mean = torch.var_mean(inp.detach(), dim=dims, unbiased=False)
                else:
                    mean, var = module.running_mean, module.running_var
                scale = torch.rsqrt(var + module.eps)
                records.append((mean, scale))
                out = original(inp)
                if capture_weights and module.weight is not None and module.weight.requires_grad:
                    normalized = (inp.detach() - _channel_view(mean, inp)) * _channel_view(scale, inp)
                    tape.weight_calls.append(WeightCall(module, normalized, get_gradient_edge(out)))
                return out

            return batch_norm_forward

        if isinstance(module, nn.ReLU):

            def relu_forward(inp):
                out = torch.relu(inp)
                records.append(out.detach())
                return out

            return relu_forward

        if isinstance(module, nn.LeakyReLU):

            def leaky_relu_forward(inp):
                records.append(inp.detach())
                return F.leaky_relu(inp, module.negative_slope)

            return leaky_relu_forward

        if isinstance(module, _SMOOTH):

            def smooth_forward(inp):
                tape.piecewise_linear = False
                out = original(inp)
                records.append(out.detach())
                return out

            return smooth_forward

        if isinstance(module, nn.MaxPool2d):

            def max_pool_forward(inp):
                out, indices = F.max_pool2d(
                    inp, module.kernel_size, module.stride, module.padding, module.dilation,
                    ceil_mode=module.ceil_mode, return_indices=True,
                )
                records.append(indices)
                return out

            return max_pool_forward

        if isinstance(module, nn.Dropout):

            def dropout_forward(inp):
                if not module.training or module.p == 0:
                    records.append(None)
                    return inp
                keep = 1.0 - module.p
                mask = torch.empty_like(inp).bernoulli_(keep).div_(keep) if keep > 0 else torch.zeros_like(inp)
                records.append(mask)
                return inp * mask

            return dropout_forward

        if isinstance(module, (*_ALREADY_LINEAR, Normalize)):
            return None

        def unknown_forward(*inputs, **kwargs):
            if kwargs or len(inputs) != 1:
                records.append(None)
            else:
                records.append(inputs[0].detach())
            return original(*inputs, **kwargs)

        tape.piecewise_linear = False
        return unknown_forward

    return make


def _linearized_forward(tape: Tape, tangent_inputs: list | None):
    """The linearized replay: biases dropped, derivatives and positions from the tape.

    When `tangent_inputs` is a list, the tangent entering each weight layer is appended to it,
    in the same order as `tape.weight_calls`.
    """
    next_record = tape.reader()

    def make(module: nn.Module, original: Callable):
        batch = tape.batch_size

        if isinstance(module, (nn.Linear, nn.Conv2d)):

            def linear_rule(h):
                if tangent_inputs is not None and module.weight.requires_grad:
                    tangent_inputs.append(h)
                if isinstance(module, nn.Linear):
                    return F.linear(h, module.weight)
                return module._conv_forward(h, module.weight, None)

            return linear_rule

        if isinstance(module, _BATCH_NORMS):

            def batch_norm_rule(h):
                _, scale = next_record(module)
                if tangent_inputs is not None and module.weight is not None and module.weight.requires_grad:
                    tangent_inputs.append(h * _channel_view(scale, h))
                gain = scale if module.weight is None else scale * module.weight
                return h * _channel_view(gain, h)

            return batch_norm_rule

        if isinstance(module, _ALREADY_LINEAR):
            return None

        if isinstance(module, Normalize):
            return lambda h: h / module.std

        if isinstance(module, nn.ReLU):
            # threshold_backward(h, out, 0) = h where out > 0, else 0: the mask in one fused kernel
            return lambda h: _elementwise(
                h, batch, lambda k: torch.ops.aten.threshold_backward(k, next_record(module), 0)
            )

        if isinstance(module, nn.LeakyReLU):

            def leaky_relu_rule(h):
                inp = next_record(module)
                return _elementwise(h, batch, lambda k: torch.where(inp > 0, k, k * module.negative_slope))

            return leaky_relu_rule

        if isinstance(module, nn.Tanh):
            return lambda h: _elementwise(h, batch, lambda k: k * (1 - next_record(module) ** 2))

        if isinstance(module, nn.Sigmoid):

            def sigmoid_rule(h):
                out = next_record(module)
                return _elementwise(h, batch, lambda k: k * (out * (1 - out)))

            return sigmoid_rule

        if isinstance(module, nn.MaxPool2d):

            def max_pool_rule(h):
                indices = next_record(module)
                stacked = h.view(-1, batch, *h.shape[1:]).flatten(3)
                positions = indices.flatten(2).expand(stacked.shape[0], -1, -1, -1)
                return stacked.gather(3, positions).view(h.shape[0], *indices.shape[1:])

            return max_pool_rule

        if isinstance(module, nn.Dropout):

            def dropout_rule(h):
                mask = next_record(module)
                return h if mask is None else _elementwise(h, batch, lambda k: k * mask)

            return dropout_rule

        if list(module.parameters(recurse=False)):
            raise UnsupportedModule(
                f"the linearized pass has no rule for {type(module).__name__}, a module with parameters; "
                f"supported: {', '.join(sorted({t.__name__ for t in KNOWN_MODULES}))}"
            )

        def jvp_rule(h):
            point = next_record(module)
            if point is None:
                raise UnsupportedModule(
                    f"the linearized pass cannot replay {type(module).__name__}: it takes more than one input"
                )
            point = point.repeat(h.shape[0] // batch, *([1] * (point.dim() - 1)))
            return torch.func.jvp(original, (point,), (h,))[1]

        return jvp_rule

    return make


@dataclass
class Linearization:
    """A recorded forward pass of `model` at `x` and the linearized replays it allows.

    >>> lin = Linearization.record(model, x)     # lin.logits = model(x), with autograd graph
    >>> lin.jvp(h)                                # J·h: the Jacobian of the logits times h
    """

    model: nn.Module
    x: torch.Tensor
    logits: torch.Tensor
    tape: Tape

    @classmethod
    def record(cls, model: nn.Module, x: torch.Tensor, capture_weights: bool = False) -> "Linearization":
        """Run model(x) once, keeping masks, pooling positions and statistics; with `capture_weights`,
        also each weight layer's input and output edge (in `tape.weight_calls`)."""
        tape = Tape(batch_size=x.shape[0])
        with patched_forwards(model, _record_forward(tape, capture_weights)):
            logits = model(x)
        lin = cls(model, x, logits, tape)
        return lin

    def jvp(self, h: torch.Tensor, tangent_inputs: list | None = None) -> torch.Tensor:
        """J·h through the linearized network. h may stack k tangents per sample: shape (k·B, ...),
        sample i of tangent t at row t·B + i. Differentiable with respect to the weights.
        The first replay of a model checks that the replay is linear (`NotLinearizable`)."""
        if h.shape[0] % self.tape.batch_size:
            raise ValueError(f"tangent batch {h.shape[0]} is not a multiple of the recorded batch {self.tape.batch_size}")
        _check_linear_once(self)
        return self._replay(h, tangent_inputs)

    def _replay(self, h: torch.Tensor, tangent_inputs: list | None = None) -> torch.Tensor:
        with patched_forwards(self.model, _linearized_forward(self.tape, tangent_inputs)):
            return self.model(h)

    def frozen_logits(self, x: torch.Tensor, weight_calls: list | None = None) -> torch.Tensor:
        """f(x) again with every BatchNorm normalizing with the recorded statistics (held constant)
        and every Dropout applying its recorded mask: the network the per-sample penalties use.
        Without batch-coupled BatchNorm that is the recorded forward itself, returned as is.
        With `weight_calls`, each weight layer's call is appended to it, as in `record`."""
        if not self.tape.batch_coupled and weight_calls is None:
            return self.logits
        with patched_forwards(self.model, _frozen_forward(self.tape, weight_calls)):
            return self.model(x)


def _capturing_weight_forward(module: nn.Module, original: Callable, weight_calls: list):
    if not module.weight.requires_grad:
        return None

    def weight_forward(inp):
        out = original(inp)
        weight_calls.append(WeightCall(module, inp, get_gradient_edge(out)))
        return out

    return weight_forward


def _frozen_forward(tape: Tape, weight_calls: list | None):
    next_record = tape.reader()

    def make(module: nn.Module, original: Callable):
        if isinstance(module, _BATCH_NORMS):

            def frozen_batch_norm(inp):
                mean, scale = next_record(module)
                normalized = (inp - _channel_view(mean, inp)) * _channel_view(scale, inp)
                out = normalized
                if module.weight is not None:
                    out = out * _channel_view(module.weight, inp)
                if weight_calls is not None and module.weight is not None and module.weight.requires_grad:
                    weight_calls.append(WeightCall(module, normalized.detach(), get_gradient_edge(out)))
                if module.bias is not None:
                    out = out + _channel_view(module.bias, inp)
                return out

            return frozen_batch_norm

        if isinstance(module, nn.Dropout):

            def frozen_dropout(inp):
                mask = next_record(module)
                return inp if mask is None else inp * mask

            return frozen_dropout

        if weight_calls is not None and isinstance(module, (nn.Linear, nn.Conv2d)):
            return _capturing_weight_forward(module, original, weight_calls)
        return None

    return make


_checked_models: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _check_linear_once(lin: Linearization) -> None:
    """Once per model: the replay must be additive, J(a+b) = J(a) + J(b), or the model's forward
    holds nonlinear operations that no module hook saw."""
    if lin.model in _checked_models:
        return
    with torch.no_grad():
        generator = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(lin.x.shape, generator=generator, dtype=lin.x.dtype).to(lin.x.device)
        b = torch.randn(lin.x.shape, generator=generator, dtype=lin.x.dtype).to(lin.x.device)
        together, apart = lin._replay(a + b), lin._replay(a) + lin._replay(b)
    tolerance = 1e-3 if lin.x.dtype != torch.float64 else 1e-8
    if not torch.allclose(together, apart, rtol=tolerance, atol=tolerance * float(apart.abs().max() + 1e-12)):
        raise NotLinearizable(
            f"{type(lin.model).__name__}.forward applies a nonlinear operation outside of a module "
            f"(for example F.relu or torch.tanh): the linearized pass cannot see it. Use nn.ReLU / nn.Tanh modules."
        )
    _checked_models[lin.model] = True


def weight_gradient(call: WeightCall, inputs: torch.Tensor, output_grad: torch.Tensor) -> torch.Tensor:
    """∂/∂W of Σ ⟨output_grad, W ⋆ inputs⟩: the weight gradient dyᵀ·x of one layer call."""
    module = call.module
    if isinstance(module, nn.Linear):
        return output_grad.reshape(-1, output_grad.shape[-1]).T @ inputs.reshape(-1, inputs.shape[-1])
    if isinstance(module, nn.Conv2d):
        return torch.nn.grad.conv2d_weight(
            inputs, module.weight.shape, output_grad, module.stride, module.padding, module.dilation, module.groups
        )
    dims = [0] + list(range(2, inputs.dim()))
    return (output_grad * inputs).sum(dim=dims)


def bias_gradient(call: WeightCall, output_grad: torch.Tensor) -> torch.Tensor:
    """∂/∂b of Σ ⟨output_grad, y⟩ for y = W ⋆ x + b: output_grad summed over all but the channel axis."""
    if isinstance(call.module, nn.Linear):
        return output_grad.reshape(-1, output_grad.shape[-1]).sum(0)
    return output_grad.sum(dim=[0] + list(range(2, output_grad.dim())))


class _ReLUIdentityBackward(torch.autograd.Function):
    """relu(x) forward, derivative 1 backward (LinBP)."""

    @staticmethod
    def forward(ctx, x):
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


@contextmanager
def linbp_backward(model: nn.Module, first: int = 1) -> Iterator[None]:
    """LinBP (Guo et al. 2020; Li et al., linbp-convergence.txt §III): inside this context the
    forward pass is unchanged, and in the backward pass the derivative of every nn.ReLU call from
    the `first`-th on (forward order, 1-based) is replaced by the identity."""
    if int(first) != first or first < 1:
        raise ValueError(f"linbp: first must be an integer ≥ 1 (the first ReLU to linearize), got {first}")
    relu_calls = [0]

    def make(module, original):
        if not isinstance(module, nn.ReLU):
            return None

        def relu_forward(inp):
            relu_calls[0] += 1
            return _ReLUIdentityBackward.apply(inp) if relu_calls[0] >= first else torch.relu(inp)

        return relu_forward

    with patched_forwards(model, make):
        yield


def power_iteration(lin: "Linearization", logits: torch.Tensor, v: torch.Tensor, n_iter: int,
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


def per_sample_norm(t: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    norms = t.flatten(1).norm(dim=1)
    return norms.view(-1, *([1] * (t.dim() - 1))) if keepdim else norms
