"""The method protocol: `stats = method.backward(model, x, y)` fills `.grad` like `loss.backward()`.

Conventions shared by every method (see each method's docstring for its formula):
  ℓ_i = loss_fn(z_i, y_i) is the per-sample loss on the logits z_i = f(x_i);
  L = (1/B) Σ_i ℓ_i is the main loss; a per-sample penalty R_i enters as β·(1/B) Σ_i R_i;
  g_i = ∇_{x_i} ℓ_i is the per-sample input gradient.
The gradient of the whole objective is *added* to each trainable parameter's `.grad`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..validation import check_batch, check_logits, check_nonnegative

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

FLOAT16_REASON = (
    "float16 needs a gradient scaler, which multiplies the loss by a factor s before the backward pass, and the "
    "input-gradient penalties do not scale linearly with it (‖s·g‖ₚᵖ = sᵖ·‖g‖ₚᵖ: the penalties differentiate g "
    "itself), so unscaling by s does not give their gradients back"
)


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ℓ_i = −log softmax(z_i)[y_i], one value per sample."""
    return F.cross_entropy(logits, labels, reduction="none")


@dataclass(frozen=True)
class StepStats:
    """loss = main_loss + reg_loss, as floats, for one batch; `correct` is how many samples of the
    clean batch the model classified right in the method's own forward pass (no extra pass)."""

    loss: float
    main_loss: float
    reg_loss: float
    correct: int


@dataclass(frozen=True)
class Parameter:
    """What a method declares about one of its parameters (the dataclass field's metadata).

    help   one line for `robustbp methods` and the command line;
    check  (value, "method: name") -> the value to store, raising ValueError that names both;
    parse  command-line text -> value (None: settable from Python only, e.g. a function);
    bench  values `robustbp bench` times besides the default (a choice that changes the cost).
    """

    help: str
    check: Callable[[Any, str], Any]
    parse: Callable[[str], Any] | None = float
    bench: tuple = ()


def parameter(default, help: str, check: Callable[[Any, str], Any], parse: Callable[[str], Any] | None = float,
              bench: tuple = ()):
    """Declare a method parameter: `beta: float = parameter(0.01, "penalty weight β", nonnegative)`."""
    return field(default=default, metadata={"parameter": Parameter(help, check, parse, bench)})


def choice(*choices):
    """A check that the value is one of `choices`."""
    def check(value, name):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    return check


def penalty_weight(default: float):
    return parameter(default, "penalty weight β", check_nonnegative)


def declared_parameters(cls) -> dict[str, tuple[Any, Parameter]]:
    """name -> (default, declaration) for every parameter a method class declares, in order."""
    return {f.name: (f.default, f.metadata["parameter"]) for f in dataclasses.fields(cls) if "parameter" in f.metadata}


@dataclass(eq=False, repr=False)
class Method:
    """Base class: checks the batch, then calls `_backward`, which subclasses implement.

    A method's parameters are dataclass fields declared with `parameter(...)`; each is checked
    once, here, when the method is built. `loss_fn(logits, labels)` must return one loss per
    sample, shape (B,); the default is cross-entropy.
    """

    loss_fn: LossFn | None = field(default=None, kw_only=True)

    name: ClassVar[str] = ""
    holds_constant: ClassVar[str] = "nothing (the exact gradient of its objective)"
    # The method differentiates through its own gradient: attention then runs on PyTorch's math
    # kernel, since the fused CPU kernel has no double backward.
    differentiates_twice: ClassVar[bool] = False
    # Why the method's gradient is not sound under bfloat16 autocast; empty when it is (the
    # gradient under autocast is checked against float32 in tests/test_amp.py).
    bf16_refusal: ClassVar[str] = ""

    def __post_init__(self):
        self.loss_fn = self.loss_fn or cross_entropy_per_sample
        if not callable(self.loss_fn):
            raise ValueError(f"{self.name}: loss_fn must be a function (logits, labels) -> per-sample losses")
        for key, (_, declaration) in declared_parameters(type(self)).items():
            setattr(self, key, declaration.check(getattr(self, key), f"{self.name}: {key}"))

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The method's persistent state between steps, for checkpoints (empty for most methods)."""
        return {}

    def load_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state between steps, but the checkpoint holds {sorted(state)}")

    def backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        params = trainable_parameters(model)
        x, y = check_batch(x, y)
        self.check_autocast(x.device.type)
        self._correct = None
        if self.differentiates_twice:
            with sdpa_kernel(SDPBackend.MATH):
                main, reg = self._backward(model, x, y, params)
        else:
            main, reg = self._backward(model, x, y, params)
        return StepStats(loss=main + reg, main_loss=main, reg_loss=reg, correct=self._correct)

    def check_autocast(self, device_type: str) -> None:
        """Refuse float16 autocast, and bfloat16 autocast for a method with a `bf16_refusal`."""
        if not torch.is_autocast_enabled(device_type):
            return
        dtype = torch.get_autocast_dtype(device_type)
        if dtype == torch.float16:
            raise ValueError(f"{self.name}: float16 autocast is not supported: {FLOAT16_REASON}; use bfloat16")
        if dtype == torch.bfloat16 and self.bf16_refusal:
            raise ValueError(f"{self.name} refuses bfloat16 autocast: {self.bf16_refusal}")

    def _backward(self, model, x, y, params) -> tuple[float, float]:
        raise NotImplementedError

    def main_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L = (1/B) Σ_i ℓ_i on the clean batch's logits; also counts the correct predictions."""
        losses = self.per_sample_loss(logits, y)
        self._correct = int((logits.detach().argmax(dim=1) == y).sum())
        return losses.mean()

    def per_sample_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_logits(logits, self.name)
        if logits.shape[1] == 1 and self.loss_fn is cross_entropy_per_sample:
            raise ValueError(
                f"{self.name}: the model returns one logit per sample, so cross-entropy is 0 whatever the weights; "
                f"return one logit per class, or pass a loss_fn made for one output (binary cross-entropy)"
            )
        num_classes = logits.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(
                f"{self.name}: labels must lie in [0, {num_classes}) for a model with {num_classes} outputs, "
                f"got values in [{int(y.min())}, {int(y.max())}]"
            )
        losses = self.loss_fn(logits, y)
        if losses.shape != (logits.shape[0],):
            raise ValueError(
                f"{self.name}: loss_fn must return one loss per sample, shape ({logits.shape[0]},), "
                f"got {tuple(losses.shape)} (use reduction='none')"
            )
        return losses

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={getattr(self, key)!r}" for key in declared_parameters(type(self)))
        return f"{type(self).__name__}({args})"


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters (none with requires_grad=True)")
    return params


def deliver(params: list, terms) -> None:
    """Add every gradient of one step to `.grad` in ONE autograd call, so each parameter's gradient
    reaches `.grad` once, through autograd's AccumulateGrad: tensor hooks (a user's clipping hook)
    fire once per parameter per step and DistributedDataParallel all-reduces once, as with
    `loss.backward()`. Each term is (tensor, grad): a scalar objective with grad None, or a tensor
    the forward used (a weight, possibly an expression of parameters) with a hand-formed gradient.
    Terms of the same tensor are summed first, in the tensor's own dtype (a gradient formed under
    autocast in bfloat16 is added to a float32 weight's in float32); terms with grad None on a
    non-scalar are skipped."""
    totals: dict[int, list] = {}
    for tensor, grad in terms:
        if grad is None:
            if tensor.dim() != 0:
                continue
            grad = torch.ones_like(tensor)
        if not tensor.requires_grad:
            continue
        grad = grad.to(tensor.dtype)
        if id(tensor) in totals:
            totals[id(tensor)][1] = totals[id(tensor)][1] + grad.detach()
        else:
            totals[id(tensor)] = [tensor, grad.detach()]
    if totals:
        tensors, grads = zip(*totals.values())
        torch.autograd.backward(tensors, grads, inputs=params)


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: make a Method (a dataclass: its `parameter(...)` fields are its parameters)
    available as `robustbp.methods.get(name, ...)`."""

    def decorate(cls: type[Method]) -> type[Method]:
        cls = dataclass(eq=False, repr=False)(cls)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def parameters_of(name: str) -> dict[str, object]:
    """The parameters a method declares and their defaults."""
    return {key: default for key, (default, _) in declared_parameters(method_class(name)).items()}


def parameter_help() -> dict[str, tuple[Callable[[str], Any] | None, str, list[tuple[str, Any]]]]:
    """Every parameter name across the registry -> (parse, help, [(method, default), ...]),
    for the command line; the first declaration's parse and help stand for the name."""
    options: dict[str, tuple] = {}
    for method in available():
        for key, (default, declaration) in declared_parameters(method_class(method)).items():
            parse, text, takers = options.setdefault(key, (declaration.parse, declaration.help, []))
            takers.append((method, default))
    return options


def bench_specs() -> tuple[str, ...]:
    """What `robustbp bench` times by default: every method at its defaults (standard first), and
    each value a method declares as worth timing, as "name:key=value"."""
    specs = ["standard"]
    for method in available():
        if method != "standard":
            specs.append(method)
        for key, (_, declaration) in declared_parameters(method_class(method)).items():
            specs += [f"{method}:{key}={value}" for value in declaration.bench]
    return tuple(specs)


def get(name: str, **kwargs) -> Method:
    """Build a method by name: `get("loss-ibp", beta=0.01, p=1)`."""
    cls = method_class(name)
    accepted = parameters_of(name)
    unknown = sorted(set(kwargs) - set(accepted) - {"loss_fn"})
    if unknown:
        raise ValueError(
            f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(accepted) or 'no parameters'}"
        )
    return cls(**kwargs)
