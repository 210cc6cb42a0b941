"""The linearized network: record a forward pass, then replay it linearly (J·h) or frozen.

The methods combine up to four passes through a network f: forward (z = f(x)), backward
(Jᵀ·u, by autograd), linearized forward (J·h) and the weight gradients that follow. The
linearized forward is the network with its biases removed and every nonlinear operation
replaced by multiplication with its derivative at the recorded forward pass (IBP paper §7.1).

How the passes see a model: every pass runs the model's own `forward` under a
`torch.overrides.TorchFunctionMode` that sees each tensor operation as it is called (F.relu,
x.relu(), torch.flatten, F.linear with whatever weight expression, parameters used anywhere),
not module classes. A call that receives an *activation* (a tensor that depends on the input) is
one step of the tape; calls on parameters and constants alone run untouched. What each
operation records and how it replays comes from one table, `robustbp.operations.RULES`.
Module hooks cannot see functional calls and a module's class does not say what its `forward`
does; the operations are what actually runs, so this is what we record.

The replay substitutes, for every operation, the arguments the recording saw except the
activations: the weight a layer multiplied with (a masked or parametrized weight, computed once
per step, with its graph to the parameters) is the weight the replay uses. A replay must take
the same path as the recording (same operations in the same order); it is checked at each step.

`Linearization.record` refuses what no pass can follow: a `torch.compile`d model (compiled code
is opaque to the mode), an output that does not depend on the input through operations seen.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import get_gradient_edge
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from .operations import RULE_OF, VALUE_FUNCTIONS, Rule, function_name, is_in_place, is_observing, is_random
from .validation import check_logits

Tensor = torch.Tensor


class UnsupportedModule(TypeError):
    """The model holds something no pass can follow (a torch.compile'd module)."""


class NotLinearizable(RuntimeError):
    """An operation in the model's forward that the linearized pass cannot replay, named."""


# ---- arguments ---------------------------------------------------------------------------

def _tensor_slots(args, kwargs):
    """(position, tensor) for every tensor argument, one level into lists and tuples."""
    for i, arg in enumerate(args):
        if isinstance(arg, Tensor):
            yield (i,), arg
        elif isinstance(arg, (list, tuple)):
            for j, item in enumerate(arg):
                if isinstance(item, Tensor):
                    yield (i, j), item
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            yield (key,), value


def _substitute(args, kwargs, values: dict):
    """args, kwargs with the tensors at `values`' positions replaced."""
    args, kwargs = list(args), dict(kwargs)
    for position, value in values.items():
        head = position[0]
        if isinstance(head, str):
            kwargs[head] = value
        elif len(position) == 1:
            args[head] = value
        else:
            items = list(args[head])
            items[position[1]] = value
            args[head] = type(args[head])(items) if isinstance(args[head], tuple) else items
    return args, kwargs


def _argument(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _leaves(out) -> list:
    """The leaves of an operation's output: itself, or the items of (nested) tuples and lists."""
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in _leaves(item)]
    return [out]


def _rebuild(out, leaves: Iterator):
    """`out`'s structure with its leaves taken in order from `leaves`."""
    if isinstance(out, (tuple, list)):
        items = [_rebuild(item, leaves) for item in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)  # a namedtuple takes fields
    return next(leaves)


def _channel_view(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-channel vector (C,) to broadcast against `like` (N, C, ...)."""
    return t.reshape(1, -1, *([1] * (like.dim() - 2)))


def _elementwise(h: Tensor, batch: int, rule: Callable) -> Tensor:
    """rule(stacked) on h of shape (k·B, ...) viewed as (k, B, ...), so that a per-sample record
    of shape (B, ...) broadcasts over k stacked tangents without being copied."""
    return rule(h.view(-1, batch, *h.shape[1:])).flatten(0, 1)


# ---- the tape ----------------------------------------------------------------------------

@dataclass
class Step:
    """One recorded operation that received an activation.

    kind is the rule's kind, or "general", "value" (replay returns the recorded output) or
    "metadata" (shape queries: replay asks the tangent). `args`/`kwargs` are the call's own
    arguments (activations included); `data` is what the rule kept (a mask, positions, ...).
    """

    func: object
    kind: str
    rule: Rule | None
    args: tuple
    kwargs: dict
    positions: tuple
    data: object = None
    version: int | None = None
    captured: bool = False
    in_place: bool = False
    draws_random: bool = False
    live: dict | None = None  # the recorded activations themselves, for the exact replay


@dataclass
class WeightCall:
    """One call of a weight operation (linear, convolution, BatchNorm's affine) in the recorded
    forward: `weight` and `bias` are the tensors it used (parameters or expressions of them),
    `input` what the weight multiplied (for BatchNorm the normalized input), `output_edge` an
    autograd edge to its output. Weight gradients are formed as (signal at output) ⊗ (input)."""

    step: Step
    weight: Tensor | None
    bias: Tensor | None
    input: Tensor
    output_edge: object

    def __post_init__(self):
        self.input_version = self.input._version

    def checked_input(self) -> Tensor:
        """The recorded input, refused if the forward changed it in place after the call."""
        if self.input._version != self.input_version:
            raise NotLinearizable(
                f"the input of {function_name(self.step.func)} was changed in place later in the forward; "
                f"Loss IBP needs it as it was (write the later operation out of place)"
            )
        return self.input


@dataclass
class Tape:
    """What one recorded forward pass left behind, in call order."""

    batch_size: int
    steps: list[Step] = field(default_factory=list)
    weight_calls: list[WeightCall] = field(default_factory=list)
    batch_coupled: bool = False   # some BatchNorm normalized with the batch's own statistics
    piecewise_linear: bool = True  # every derivative is locally constant: the replay is exact in θ
    fusable: bool = True          # parameters enter only as weights and biases of weight operations
    stackable: bool = True        # the batch stays in dim 0: k tangents can share one replay
    general_steps: list[str] = field(default_factory=list)


class _Tracing(TorchFunctionMode):
    """Follows which tensors are activations (depend on the pass's input); hands every call that
    receives one to `step`. Strong references keep the ids valid while the pass runs."""

    def __init__(self, root: Tensor):
        super().__init__()
        self.traced: dict[int, Tensor] = {id(root): root}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        traced = self.traced
        slots = [(position, t) for position, t in _tensor_slots(args, kwargs) if id(t) in traced]
        if not slots or is_observing(func):
            return func(*args, **kwargs)
        out = self.step(func, args, kwargs, slots)
        self.trace(out)
        return out

    def trace(self, out) -> None:
        if isinstance(out, Tensor):
            if out.is_floating_point():
                self.traced[id(out)] = out
        elif isinstance(out, (list, tuple)):
            for item in out:
                self.trace(item)

    def step(self, func, args, kwargs, slots):
        raise NotImplementedError


def _fits(rule: Rule, func, args, kwargs, slots) -> bool:
    """Whether the explicit rule covers this call, or it needs the general route."""
    positions = [p for p, _ in slots]
    kind = rule.kind
    if kind in ("weight", "piecewise", "smooth", "pooling", "dropout", "batch-norm"):
        if positions != [(0,)]:
            return False
        if kind in ("weight", "batch-norm"):
            return True
        return all(not isinstance(v, Tensor) for v in (*args[1:], *kwargs.values()))
    if kind == "additive":
        return not is_in_place(func) or positions[0] == (0,)
    if kind == "scaling":
        name = function_name(func)
        if len(positions) != 1 or kwargs.get("rounding_mode") is not None:  # floor division is not linear
            return False
        return positions[0] == (0,) or name in ("mul", "__mul__", "__rmul__")
    if kind == "structural":
        if len(positions) != len(list(_tensor_slots(args, kwargs))):
            return False  # a constant tensor among the arguments (torch.cat([cls_token, x]))
        if func is F.pad:
            mode = _argument(args, kwargs, 2, "mode", "constant")
            return mode != "constant" or not _argument(args, kwargs, 3, "value", None)
        return True
    return False


_DIM_MOVERS = frozenset(
    f for f in (torch.permute, torch.transpose, torch.movedim, Tensor.permute, Tensor.transpose, Tensor.t,
                Tensor.movedim) if f is not None
)


def _batch_stays_leading(func, args, kwargs, out, batch: int) -> bool:
    if func in _DIM_MOVERS:
        return False
    if function_name(func) in ("sum", "mean"):
        dims = _argument(args, kwargs, 1, "dim", None)
        if dims is None or 0 in (dims if isinstance(dims, (list, tuple)) else (dims,)):
            return False
    outputs = [t for t in _leaves(out) if isinstance(t, Tensor)]
    return all(t.dim() > 0 and t.shape[0] == batch for t in outputs)


def _requires_grad_constant(tensors, traced) -> bool:
    return any(t.requires_grad and id(t) not in traced for t in tensors)


def _refuse_custom_function(t: Tensor) -> None:
    """A custom autograd.Function's backward may differ from the derivative of the operations its
    forward performs (a straight-through estimator): no replay of the forward can follow it."""
    if isinstance(t.grad_fn, BackwardCFunction):
        raise NotLinearizable(
            f"the linearized pass cannot follow the custom autograd.Function {type(t.grad_fn).__name__}: "
            f"its backward is its own, not the derivative of its forward; methods that replay the network "
            f"linearly (loss-ibp, fast-tangent-prop, prediction-ibp, tangent-prop, jacobian-spectral) refuse it"
        )


def _run_noting_random_draws(func, args, kwargs, slots) -> tuple[object, bool]:
    """Run a call that has no rule; also say whether it drew random numbers inside (attention with
    dropout_p > 0 in training), which a replay would draw again differently."""
    device = slots[0][1].device
    generator = torch.default_generator if device.type == "cpu" else None
    before = generator.get_state() if generator is not None else torch.cuda.get_rng_state(device)
    out = func(*args, **kwargs)
    after = generator.get_state() if generator is not None else torch.cuda.get_rng_state(device)
    return out, not torch.equal(before, after)


def _refuse_random_step(step: "Step") -> None:
    if step.draws_random:
        raise NotLinearizable(
            f"the passes cannot replay {function_name(step.func)}: it drew random numbers (dropout inside the "
            f"call?), which a replay would draw again differently; set its dropout to 0 or use eval mode"
        )


class _Recording(_Tracing):
    def __init__(self, tape: Tape, root: Tensor, capture_weights: bool):
        super().__init__(root)
        self.tape, self.capture_weights = tape, capture_weights

    def step(self, func, args, kwargs, slots):
        for _, t in slots:
            _refuse_custom_function(t)
        tape = self.tape
        rule = RULE_OF.get(func)
        positions = tuple(p for p, _ in slots)
        if func in VALUE_FUNCTIONS:
            out = func(*args, **kwargs)
            tape.steps.append(Step(func, "value", None, (), {}, positions, data=out))
            return out
        kind = rule.kind if rule is not None and _fits(rule, func, args, kwargs, slots) else "general"
        step = Step(func, kind, rule, args, kwargs, positions)
        out = getattr(self, "_record_" + kind.replace("-", "_"))(step, slots)
        if kind == "general" and not any(isinstance(t, Tensor) and t.is_floating_point() for t in _leaves(out)):
            step.kind = "value" if any(isinstance(t, Tensor) for t in _leaves(out)) or func in VALUE_FUNCTIONS \
                else "metadata"
            step.data = out
            if step.kind == "value":
                tape.stackable = False
        elif kind == "general":
            tape.general_steps.append(function_name(func))
        tape.steps.append(step)
        return out

    def _record_weight(self, step, slots):
        args, kwargs = step.args, step.kwargs
        out = step.func(*args, **kwargs)
        weight = _argument(args, kwargs, 1, "weight")
        bias = _argument(args, kwargs, 2, "bias")
        trainable = [t for t in (weight, bias) if isinstance(t, Tensor) and t.requires_grad]
        if self.capture_weights and trainable and out.requires_grad:
            step.captured = True
            self.tape.weight_calls.append(WeightCall(step, weight, bias, args[0].detach(), get_gradient_edge(out)))
        return out

    def _record_piecewise(self, step, slots):
        return self._record_elementwise(step, slots)

    def _record_smooth(self, step, slots):
        self.tape.piecewise_linear = False
        return self._record_elementwise(step, slots)

    def _record_elementwise(self, step, slots):
        inp = step.args[0]
        step.in_place = is_in_place(step.func) or any(v is True for v in (*step.args[1:], *step.kwargs.values()))
        kept_input = None
        if not step.rule.record_output:
            kept_input = inp.detach().clone() if step.in_place else inp.detach()
        out = step.func(*step.args, **step.kwargs)
        kept = out.detach() if step.rule.record_output else kept_input
        step.data, step.version = kept, kept._version
        step.live = {(0,): out if step.rule.record_output else inp}
        return out

    def _record_pooling(self, step, slots):
        args, kwargs = step.args, step.kwargs
        wants_indices = _argument(args, kwargs, 6, "return_indices", False)
        call_kwargs = {k: v for k, v in kwargs.items() if k != "return_indices"}
        out, indices = step.func(*args[:6], **call_kwargs, return_indices=True)
        step.data = indices
        return (out, indices) if wants_indices else out

    def _record_dropout(self, step, slots):
        args, kwargs = step.args, step.kwargs
        inp = args[0]
        p = _argument(args, kwargs, 1, "p", 0.5)
        training = _argument(args, kwargs, 2, "training", True)
        in_place = _argument(args, kwargs, 3, "inplace", False)
        if not training or p == 0:
            step.data = None
            return step.func(*args, **kwargs)
        # The mask as the native kernel draws it (same random numbers), kept for every later pass.
        mask = step.func(torch.ones_like(inp), p, True)
        step.data = mask
        return inp.mul_(mask) if in_place else inp * mask

    def _record_batch_norm(self, step, slots):
        args, kwargs = step.args, step.kwargs
        inp = args[0]
        running_mean, running_var = _argument(args, kwargs, 1, "running_mean"), _argument(args, kwargs, 2, "running_var")
        weight, bias = _argument(args, kwargs, 3, "weight"), _argument(args, kwargs, 4, "bias")
        training, eps = _argument(args, kwargs, 5, "training", False), _argument(args, kwargs, 7, "eps", 1e-5)
        if training:
            self.tape.batch_coupled = True
            var, mean = torch.var_mean(inp.detach(), dim=[0] + list(range(2, inp.dim())), unbiased=False)
        else:
            mean, var = running_mean.clone(), running_var.clone()
        scale = torch.rsqrt(var + eps)
        step.data = (mean, scale, weight, bias)
        out = step.func(*args, **kwargs)
        if self.capture_weights and isinstance(weight, Tensor) and weight.requires_grad:
            step.captured = True
            normalized = (inp.detach() - _channel_view(mean, inp)) * _channel_view(scale, inp)
            self.tape.weight_calls.append(WeightCall(step, weight, bias, normalized, get_gradient_edge(out)))
        return out

    def _record_additive(self, step, slots):
        others = [t for _, t in _tensor_slots(step.args, step.kwargs)]
        if _requires_grad_constant(others, self.traced):
            self.tape.fusable = False  # a parameter added to an activation (a positional embedding)
        step.in_place = is_in_place(step.func)
        return step.func(*step.args, **step.kwargs)

    def _record_scaling(self, step, slots):
        return self._record_additive(step, slots)

    def _record_structural(self, step, slots):
        out = step.func(*step.args, **step.kwargs)
        if not _batch_stays_leading(step.func, step.args, step.kwargs, out, self.tape.batch_size):
            self.tape.stackable = False
        return out

    def _record_general(self, step, slots):
        name = function_name(step.func)
        if is_random(step.func):
            raise NotLinearizable(
                f"the linearized pass cannot replay {name}: it draws random numbers and has no rule; "
                f"use nn.Dropout / F.dropout, whose mask is recorded"
            )
        if is_in_place(step.func):
            raise NotLinearizable(
                f"the linearized pass cannot replay the in-place operation {name} on an activation; "
                f"write it out of place (for example y = x + c instead of x[...] = c or x.{name}(...))"
            )
        tape = self.tape
        tape.piecewise_linear = tape.stackable = False
        out, step.draws_random = _run_noting_random_draws(step.func, step.args, step.kwargs, slots)
        if _requires_grad_constant([t for _, t in _tensor_slots(step.args, step.kwargs)], self.traced):
            tape.fusable = False
        step.data = {position: t.detach() for position, t in slots}  # the point the derivative is taken at
        step.live = dict(slots)
        return out


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm from elementary operations. PyTorch's fused kernel gives wrong derivatives of its
    forward-mode derivative (checked against finite differences in tests), which the exact
    methods differentiate; its elementary operations do not."""
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    centered = input - mean
    out = centered * torch.rsqrt(centered.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


# Operations whose general route uses an equivalent made of elementary operations.
_DECOMPOSED = {F.layer_norm: _layer_norm}


class _Replaying(_Tracing):
    """Runs the model's forward again on a tangent h; each operation that receives an activation
    is matched with its recorded step and replaced by its linear map."""

    def __init__(self, tape: Tape, root: Tensor, tangent_inputs: list | None, exact: bool = False):
        super().__init__(root)
        self.tape, self.tangent_inputs, self.exact = tape, tangent_inputs, exact
        self.index = 0
        self.batch = tape.batch_size

    def next_step(self, func, slots) -> Step:
        steps = self.tape.steps
        if self.index >= len(steps) or steps[self.index].func != func:
            recorded = function_name(steps[self.index].func) if self.index < len(steps) else "the end of the forward"
            raise NotLinearizable(
                f"the model's forward took a different path when replayed: operation {self.index + 1} was "
                f"{recorded} when recorded and {function_name(func)} now; a forward whose operations depend "
                f"on values the passes cannot see (a Python random draw, a global counter) cannot be linearized"
            )
        step = steps[self.index]
        self.index += 1
        if tuple(p for p, _ in slots) != step.positions:
            raise NotLinearizable(f"{function_name(func)} received the input through other arguments when replayed")
        return step

    def step(self, func, args, kwargs, slots):
        step = self.next_step(func, slots)
        if step.kind == "value":
            return step.data
        if step.kind in ("metadata", "structural"):
            return func(*args, **kwargs)
        tangents = dict(slots)
        return getattr(self, "_linear_" + step.kind.replace("-", "_"))(step, tangents, args, kwargs)

    def _write_in_place(self, step, target: Tensor, value: Tensor) -> Tensor:
        if step.in_place:
            return target.copy_(value)
        return value

    def _linear_weight(self, step, tangents, args, kwargs):
        h = tangents[(0,)]
        if step.captured and self.tangent_inputs is not None:
            self.tangent_inputs.append(h)
        call_args, call_kwargs = _substitute(step.args, step.kwargs, {(0,): h})
        if "bias" in call_kwargs:
            call_kwargs["bias"] = None
        elif len(call_args) > 2:
            call_args[2] = None
        return step.func(*call_args, **call_kwargs)

    def _linear_piecewise(self, step, tangents, args, kwargs):
        h = tangents[(0,)]
        kept = self._kept(step)
        if step.rule.name == "relu":
            # threshold_backward(h, out, 0) = h where out > 0, else 0: the mask in one fused kernel
            value = _elementwise(h, self.batch, lambda k: torch.ops.aten.threshold_backward(k, kept, 0))
        else:
            slope = _argument(step.args, step.kwargs, 1, "negative_slope", 0.01)
            value = _elementwise(h, self.batch, lambda k: torch.where(kept > 0, k, k * slope))
        return self._write_in_place(step, h, value)

    def _linear_smooth(self, step, tangents, args, kwargs):
        h = tangents[(0,)]
        if self.exact:
            derivative = self._live_derivative(step)
            return self._write_in_place(step, h, _elementwise(h, self.batch, lambda k: k * derivative))
        derivative = step.data if isinstance(step.data, tuple) else None
        if derivative is None:
            kept = self._kept(step)
            if step.rule.derivative is not None:
                value = step.rule.derivative(kept)
            else:
                call_kwargs = {k: v for k, v in step.kwargs.items() if k != "inplace"}
                call_args = [a for a in step.args[1:] if not isinstance(a, bool)]
                value = torch.func.jvp(lambda t: step.func(t, *call_args, **call_kwargs), (kept,), (torch.ones_like(kept),))[1]
            step.data, derivative = (value,), (value,)
        return self._write_in_place(step, h, _elementwise(h, self.batch, lambda k: k * derivative[0]))

    def _live_derivative(self, step) -> Tensor:
        """f'(a) at the recorded activation itself, differentiable in θ (the exact replay)."""
        live = step.live[(0,)]
        if live._version != step.version:
            raise NotLinearizable(
                f"the tensor {function_name(step.func)} produced was changed in place later in the forward; "
                f"the exact linearized pass needs it as it was (write the later operation out of place)"
            )
        if step.rule.derivative is not None:
            return step.rule.derivative(live)
        call_kwargs = {k: v for k, v in step.kwargs.items() if k != "inplace"}
        call_args = [a for a in step.args[1:] if not isinstance(a, bool)]
        if not (live.requires_grad and torch.is_grad_enabled()):  # nothing to differentiate: its value
            return torch.func.jvp(lambda t: step.func(t, *call_args, **call_kwargs), (live,), (torch.ones_like(live),))[1]
        with torch.enable_grad():
            (derivative,) = torch.autograd.grad(step.func(live, *call_args, **call_kwargs).sum(), live,
                                                create_graph=True)
        return derivative

    def _kept(self, step) -> Tensor:
        kept = step.data
        if kept._version != step.version:
            raise NotLinearizable(
                f"the tensor {function_name(step.func)} recorded was changed in place later in the forward; "
                f"the linearized pass needs it as it was (write the later operation out of place)"
            )
        return kept

    def _linear_pooling(self, step, tangents, args, kwargs):
        h, indices = tangents[(0,)], step.data
        stacked = h.view(-1, self.batch, *h.shape[1:]).flatten(3)
        positions = indices.flatten(2).expand(stacked.shape[0], -1, -1, -1)
        out = stacked.gather(3, positions).view(h.shape[0], *indices.shape[1:])
        wants_indices = _argument(step.args, step.kwargs, 6, "return_indices", False)
        return (out, indices) if wants_indices else out

    def _linear_dropout(self, step, tangents, args, kwargs):
        h, mask = tangents[(0,)], step.data
        if mask is None:
            return h
        return self._write_in_place(step, h, _elementwise(h, self.batch, lambda k: k * mask))

    def _linear_batch_norm(self, step, tangents, args, kwargs):
        h = tangents[(0,)]
        _, scale, weight, _ = step.data
        if step.captured and self.tangent_inputs is not None:
            self.tangent_inputs.append(h * _channel_view(scale, h))
        gain = scale if weight is None else scale * weight
        return h * _channel_view(gain, h)

    def _linear_additive(self, step, tangents, args, kwargs):
        # Constants (numbers, buffers, parameters) added to an activation drop out of J·h.
        values = {}
        for position, value in _tensor_slots(args, kwargs):
            if position not in tangents:
                values[position] = torch.zeros_like(value)
        call_args, call_kwargs = _substitute(args, kwargs, values)
        for index in (0, 1):
            if index < len(call_args) and not isinstance(call_args[index], Tensor):
                call_args[index] = 0
        if "other" in call_kwargs and not isinstance(call_kwargs["other"], Tensor):
            call_kwargs["other"] = 0
        return step.func(*call_args, **call_kwargs)

    def _linear_scaling(self, step, tangents, args, kwargs):
        call_args, call_kwargs = _substitute(step.args, step.kwargs, tangents)
        return step.func(*call_args, **call_kwargs)

    def _linear_general(self, step, tangents, args, kwargs):
        _refuse_random_step(step)
        positions = list(step.data)
        points = [(step.live if self.exact else step.data)[p] for p in positions]
        func = _DECOMPOSED.get(step.func, step.func)
        directions = [tangents[p] for p in positions]
        template = {}

        def call(*activations):
            call_args, call_kwargs = _substitute(step.args, step.kwargs, dict(zip(positions, activations)))
            out = func(*call_args, **call_kwargs)
            leaves = _leaves(out)
            floating = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.is_floating_point()]
            template.update(out=out, leaves=leaves, floating=floating)
            return tuple(leaves[i] for i in floating)

        try:
            with sdpa_kernel(SDPBackend.MATH):
                _, out_tangents = torch.func.jvp(call, tuple(points), tuple(directions))
        except Exception as error:  # noqa: BLE001  (named and re-raised as one clear error)
            raise NotLinearizable(
                f"the linearized pass has no rule for {function_name(step.func)} and its forward-mode "
                f"derivative failed: {str(error).splitlines()[0]}"
            ) from error
        leaves = [leaf.detach() if isinstance(leaf, Tensor) else leaf for leaf in template["leaves"]]
        for i, tangent in zip(template["floating"], out_tangents):
            leaves[i] = tangent
        return _rebuild(template["out"], iter(leaves))


class _Frozen(_Tracing):
    """The forward again with every BatchNorm normalizing with the recorded statistics (held
    constant) and every dropout applying its recorded mask: the network the penalties use."""

    def __init__(self, tape: Tape, root: Tensor, weight_calls: list | None):
        super().__init__(root)
        self.tape, self.weight_calls = tape, weight_calls
        self.matcher = _Replaying(tape, root, None)

    def step(self, func, args, kwargs, slots):
        step = self.matcher.next_step(func, slots)
        if step.kind == "batch-norm":
            inp = args[0]
            mean, scale, weight, bias = step.data
            normalized = (inp - _channel_view(mean, inp)) * _channel_view(scale, inp)
            out = normalized if weight is None else normalized * _channel_view(weight, inp)
            if self.weight_calls is not None and step.captured:
                self.weight_calls.append(WeightCall(step, weight, bias, normalized.detach(), get_gradient_edge(out)))
            return out if bias is None else out + _channel_view(bias, inp)
        if step.kind == "dropout":
            mask = step.data
            return args[0] if mask is None else args[0] * mask
        if step.kind == "value":
            return step.data
        _refuse_random_step(step)
        out = func(*args, **kwargs)
        if step.kind == "weight" and step.captured and self.weight_calls is not None:
            weight, bias = _argument(args, kwargs, 1, "weight"), _argument(args, kwargs, 2, "bias")
            self.weight_calls.append(WeightCall(step, weight, bias, args[0].detach(), get_gradient_edge(out)))
        return out


# ---- the public object -------------------------------------------------------------------

def is_compiled(model: nn.Module) -> bool:
    """Whether the model holds a torch.compile'd module (whose operations no mode can see)."""
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    compiled = getattr(compiled, "OptimizedModule", None)
    return compiled is not None and any(isinstance(m, compiled) for m in model.modules())


def refuse_compiled(model: nn.Module) -> None:
    if is_compiled(model):
        raise UnsupportedModule(
            f"{type(model).__name__} holds a torch.compile'd module, whose operations the passes cannot see; "
            f"pass the module itself (torch.compile has no double backward today)"
        )


def holds_sync_batch_norm(model: nn.Module) -> bool:
    """Whether the model holds an nn.SyncBatchNorm in train mode, which normalizes with statistics
    gathered from every process inside a custom autograd.Function: no replay on one process can follow it."""
    return any(isinstance(m, nn.SyncBatchNorm) and m.training for m in model.modules())


def refuse_sync_batch_norm(model: nn.Module) -> None:
    if holds_sync_batch_norm(model):
        raise UnsupportedModule(
            f"{type(model).__name__} holds an nn.SyncBatchNorm in train mode, whose statistics come from every "
            f"process's batch, which the linearized pass cannot record; use nn.BatchNorm (under "
            f"DistributedDataParallel each process then normalizes with its own slice of the batch)"
        )


def _run(model: nn.Module, x: Tensor, mode: _Tracing, what: str):
    with mode:
        out = model(x)
    check_logits(out, type(model).__name__)
    if id(out) not in mode.traced:
        raise NotLinearizable(
            f"{type(model).__name__}'s output does not depend on its input through operations the {what} can "
            f"see (a C++ extension or compiled code in forward?)"
        )
    return out


@dataclass
class Linearization:
    """A recorded forward pass of `model` at `x` and the linearized replays it allows.

    >>> lin = Linearization.record(model, x)     # lin.logits = model(x), with autograd graph
    >>> lin.jvp(h)                                # J·h: the Jacobian of the logits times h
    """

    model: nn.Module
    x: Tensor
    logits: Tensor
    tape: Tape

    @classmethod
    def record(cls, model: nn.Module, x: Tensor, capture_weights: bool = False) -> "Linearization":
        """Run model(x) once, keeping masks, pooling positions and statistics; with `capture_weights`,
        also each weight operation's input and output edge (in `tape.weight_calls`)."""
        refuse_compiled(model)
        refuse_sync_batch_norm(model)
        tape = Tape(batch_size=x.shape[0])
        logits = _run(model, x, _Recording(tape, x, capture_weights), "recording")
        _refuse_custom_function(logits)
        return cls(model, x, logits, tape)

    def jvp(self, h: Tensor, tangent_inputs: list | None = None, exact: bool = False) -> Tensor:
        """J·h through the linearized network. h may stack k tangents per sample: shape (k·B, ...),
        sample i of tangent t at row t·B + i. Differentiable with respect to the parameters: with
        the derivatives of nonlinear operations held at the recorded point (IBP), or, `exact`, as
        functions of θ too (every second-order term; what prediction-ibp and tangent-prop need).
        With `tangent_inputs`, the tangent entering each captured weight operation is appended
        to it, in the order of `tape.weight_calls`."""
        batch = self.tape.batch_size
        if h.shape[0] % batch:
            raise ValueError(f"tangent batch {h.shape[0]} is not a multiple of the recorded batch {batch}")
        _check_linear(self)
        if h.shape[0] == batch or self.tape.stackable:
            return self._replay(h, tangent_inputs, exact)
        if tangent_inputs is not None:
            raise ValueError("tangent_inputs needs one tangent per sample on this model")
        return torch.cat([self._replay(part, exact=exact) for part in h.split(batch)])

    def _replay(self, h: Tensor, tangent_inputs: list | None = None, exact: bool = False) -> Tensor:
        mode = _Replaying(self.tape, h, tangent_inputs, exact)
        out = _run(self.model, h, mode, "linearized pass")
        if mode.index != len(self.tape.steps):
            raise NotLinearizable("the model's forward took a shorter path when replayed than when recorded")
        return out

    def frozen_logits(self, x: Tensor, weight_calls: list | None = None) -> Tensor:
        """f(x) again with every BatchNorm normalizing with the recorded statistics (held constant)
        and every dropout applying its recorded mask: the network the per-sample penalties use.
        Without batch-coupled BatchNorm that is the recorded forward itself, returned as is.
        With `weight_calls`, each captured weight operation's call is appended to it."""
        if not self.tape.batch_coupled and weight_calls is None:
            return self.logits
        return _run(self.model, x, _Frozen(self.tape, x, weight_calls), "frozen forward")


_checked: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()

# How far J(a+b) may be from J(a) + J(b), relative to the largest output, in each dtype the network
# computes in: rounding, not a nonlinearity (which is off by O(1)). Under bfloat16 autocast
# (8 bits of mantissa, rounding after each operation) the replays measure about 1e-2 apart.
LINEARITY_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the network computes in on x: the autocast dtype when autocast is on for x's device."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _check_linear(lin: Linearization) -> None:
    """The replay must be additive, J(a+b) = J(a) + J(b): a last guard against operations the mode
    did not see. Checked once per model, per train/eval configuration and per set of parameters."""
    model = lin.model
    compute_dtype = _compute_dtype(lin.x)
    key = (tuple((id(m), m.training) for m in model.modules()), tuple(id(p) for p in model.parameters()),
           lin.x.dtype, compute_dtype, tuple(lin.x.shape[1:]))
    if key in _checked.get(model, ()):
        return
    with torch.no_grad():
        generator = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(lin.x.shape, generator=generator, dtype=lin.x.dtype).to(lin.x.device)
        b = torch.randn(lin.x.shape, generator=generator, dtype=lin.x.dtype).to(lin.x.device)
        together, apart = lin._replay(a + b), lin._replay(a) + lin._replay(b)
    tolerance = LINEARITY_TOLERANCE.get(compute_dtype, LINEARITY_TOLERANCE[torch.float32])
    if not torch.allclose(together.float(), apart.float(), rtol=tolerance,
                          atol=tolerance * float(apart.abs().max() + 1e-12)):
        raise NotLinearizable(
            f"{type(model).__name__}.forward applies an operation the linearized pass does not see "
            f"(its replay is not linear); see `robustbp layers` for what it follows"
        )
    _checked.setdefault(model, set()).add(key)


# ---- weight gradients of one recorded call -----------------------------------------------

def _conv_padding(step: Step, weight: Tensor):
    padding = _argument(step.args, step.kwargs, 4, "padding", 0)
    if padding == "valid":
        return 0
    if padding == "same":
        dilation = _argument(step.args, step.kwargs, 5, "dilation", 1)
        dims = weight.dim() - 2
        dilation = (dilation,) * dims if isinstance(dilation, int) else tuple(dilation)
        totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        if any(t % 2 for t in totals):
            return None  # asymmetric: no explicit padding gives it
        return tuple(t // 2 for t in totals)
    return padding


_CONV_WEIGHT_GRADIENT = {F.conv1d: torch.nn.grad.conv1d_weight, F.conv2d: torch.nn.grad.conv2d_weight,
                         F.conv3d: torch.nn.grad.conv3d_weight}


def weight_gradient(call: WeightCall, inputs: Tensor, output_grad: Tensor) -> Tensor:
    """∂/∂W of Σ ⟨output_grad, W ⋆ inputs⟩: the weight gradient dyᵀ·x of one call."""
    step, weight = call.step, call.weight
    if step.kind == "batch-norm":
        return (output_grad * inputs).sum(dim=[0] + list(range(2, inputs.dim())))
    if step.func is F.linear:
        return output_grad.reshape(-1, output_grad.shape[-1]).T @ inputs.reshape(-1, inputs.shape[-1])
    stride = _argument(step.args, step.kwargs, 3, "stride", 1)
    dilation = _argument(step.args, step.kwargs, 5, "dilation", 1)
    groups = _argument(step.args, step.kwargs, 6, "groups", 1)
    padding = _conv_padding(step, weight)
    inputs = inputs.to(output_grad.dtype)  # under autocast the first input is float32, the signal bfloat16
    if padding is None:
        def convolution(w):
            return step.func(inputs, w, None, stride, "same", dilation, groups)
        return torch.func.vjp(convolution, weight.detach())[1](output_grad)[0]
    return _CONV_WEIGHT_GRADIENT[step.func](inputs, weight.shape, output_grad, stride, padding, dilation, groups)


def bias_gradient(call: WeightCall, output_grad: Tensor) -> Tensor:
    """∂/∂b of Σ ⟨output_grad, y⟩ for y = W ⋆ x + b: output_grad summed over all but the channel axis."""
    if call.step.func is F.linear:
        return output_grad.reshape(-1, output_grad.shape[-1]).sum(0)
    return output_grad.sum(dim=[0] + list(range(2, output_grad.dim())))
