"""One table of operation rules: how each tensor operation a model's `forward` performs is
recorded, replayed linearly (J·h) and replayed frozen (statistics and masks held).

The linearized network (`robustbp.passes`) sees the operations themselves, through a
`torch.overrides.TorchFunctionMode`, not module classes: `F.relu`, `x.relu()`, `nn.ReLU()`,
`torch.flatten`, a masked weight `F.linear(x, w * mask)` all arrive here as the call they make.
Each entry below is one `Rule`; every list the package shows (the README's table,
`robustbp layers`) is derived from `RULES`. Adding an operation is one entry.

An operation without an entry takes the general route: `torch.func.jvp` of that one call at its
recorded inputs (its derivative held at the recorded point, parameters used inside the call kept
live), under PyTorch's math attention kernel, which has forward-mode AD. Operations the general
route cannot take (random operations, operations in place, calls whose forward-mode derivative
is missing) are refused with one error that names them.

Kinds of rule:
    weight       y = W ⋆ a + b          h ↦ W ⋆ h               (Loss IBP forms dW = dyᵀ·(a + ã))
    piecewise    ReLU, LeakyReLU        h ↦ f'(a) ⊙ h           (f' locally constant)
    smooth       Tanh, GELU, ...        h ↦ f'(a) ⊙ h           (f' held at the recorded point)
    pooling      max-pool               h ↦ h[argmax positions]
    dropout      dropout, dropout2d     h ↦ mask ⊙ h            (the recorded mask)
    batch-norm   F.batch_norm           h ↦ γ/√(σ²+ε) ⊙ h       (batch statistics held constant)
    additive     a + c, a − c, a + b    h ↦ h (+ h_b)           (constants dropped)
    scaling      a · c, a / c, −a       h ↦ h · c               (c not depending on the input; live)
    structural   view, flatten, cat ... h ↦ op(h)               (linear: the op itself)
    general      anything else          h ↦ jvp(op, a; h)       (derivative at the recorded point)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Rule:
    """One operation: `functions` are the torch callables that reach it (F.relu, Tensor.relu, ...).

    kind          one of the kinds in the module docstring;
    derivative    for elementwise rules: the recorded tensor -> f'(a) (None: computed by jvp);
    record_output for elementwise rules: keep the output (True) or the input (False);
    piecewise     the derivative is locally constant (the replay is exact in θ as well).
    """

    name: str
    kind: str
    functions: tuple
    derivative: Callable | None = None
    record_output: bool = False
    piecewise: bool = True
    note: str = ""


def _functions(*candidates) -> tuple:
    return tuple(f for f in candidates if f is not None)


def _method(name: str):
    return getattr(Tensor, name, None)


def _leaky_slope(args, kwargs) -> float:
    return kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)


RULES: tuple[Rule, ...] = (
    Rule("linear", "weight", _functions(F.linear), note="F.linear(a, W, b), W any expression"),
    Rule("conv1d", "weight", _functions(F.conv1d), note="padding ints, 'same', 'valid'"),
    Rule("conv2d", "weight", _functions(F.conv2d), note="nn.Conv2d padding modes arrive as F.pad + conv2d"),
    Rule("conv3d", "weight", _functions(F.conv3d)),
    Rule("relu", "piecewise",
         _functions(F.relu, F.relu_, torch.relu, torch.relu_, _method("relu"), _method("relu_")),
         record_output=True, note="module, functional, method, in place"),
    Rule("leaky_relu", "piecewise", _functions(F.leaky_relu, F.leaky_relu_),
         note="h ↦ where(a > 0, h, slope·h)"),
    Rule("tanh", "smooth", _functions(torch.tanh, F.tanh, _method("tanh")), record_output=True,
         derivative=lambda out: 1 - out * out, piecewise=False),
    Rule("sigmoid", "smooth", _functions(torch.sigmoid, F.sigmoid, _method("sigmoid")), record_output=True,
         derivative=lambda out: out * (1 - out), piecewise=False),
    Rule("gelu", "smooth", _functions(F.gelu), piecewise=False),
    Rule("silu", "smooth", _functions(F.silu), piecewise=False),
    Rule("elu", "smooth", _functions(F.elu), piecewise=False),
    Rule("softplus", "smooth", _functions(F.softplus), piecewise=False),
    Rule("max_pool", "pooling", _functions(F.max_pool1d, F.max_pool2d, F.max_pool3d),
         note="the recorded argmax positions"),
    Rule("dropout", "dropout", _functions(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d),
         note="mask drawn once per step, reused by every pass"),
    Rule("batch_norm", "batch-norm", _functions(F.batch_norm),
         note="train mode: batch statistics held constant in the penalties"),
    Rule("add, sub", "additive",
         _functions(torch.add, torch.sub, torch.subtract, torch.rsub, _method("add"), _method("sub"),
                    _method("__add__"), _method("__radd__"), _method("__sub__"), _method("__rsub__"),
                    _method("add_"), _method("sub_"), _method("__iadd__"), _method("__isub__")),
         note="constants and parameters added to an activation drop out of J·h"),
    Rule("mul, div, neg", "scaling",
         _functions(torch.mul, torch.div, torch.neg, _method("mul"), _method("div"), _method("neg"),
                    _method("__mul__"), _method("__rmul__"), _method("__truediv__"), _method("__neg__"),
                    _method("mul_"), _method("div_"), _method("__imul__"), _method("__itruediv__")),
         note="by a factor not depending on the input (a LayerScale γ stays live); else general"),
    Rule("shape and linear reductions", "structural",
         _functions(torch.flatten, torch.reshape, torch.cat, torch.concat, torch.stack, torch.permute,
                    torch.transpose, torch.squeeze, torch.unsqueeze, torch.chunk, torch.split, torch.narrow,
                    torch.movedim, torch.sum, torch.mean, torch.clone, torch.unbind, torch.select,
                    _method("flatten"), _method("unflatten"), _method("view"), _method("reshape"),
                    _method("permute"), _method("transpose"), _method("t"), _method("contiguous"),
                    _method("squeeze"), _method("unsqueeze"), _method("expand"), _method("expand_as"),
                    _method("repeat"), _method("__getitem__"), _method("chunk"), _method("split"),
                    _method("narrow"), _method("movedim"), _method("sum"), _method("mean"),
                    _method("clone"), _method("unbind"), _method("select"), _method("view_as"),
                    _method("reshape_as"), _method("to"), _method("float"), _method("double"),
                    _method("type_as"), F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                    F.pixel_shuffle, F.pixel_unshuffle, F.interpolate, F.pad),
         note="applied to h as they are (F.pad only with zero fill)"),
    Rule("layer_norm", "general", _functions(F.layer_norm), piecewise=False,
         note="normalization derivative held at the recorded point; γ, β live"),
    Rule("group_norm", "general", _functions(F.group_norm), piecewise=False,
         note="per sample, like layer_norm"),
    Rule("attention", "general",
         _functions(F.scaled_dot_product_attention, F.multi_head_attention_forward), piecewise=False,
         note="derivative at the recorded point; in-projection weights live inside the call"),
)

RULE_OF: dict = {}
for _rule in RULES:
    for _function in _rule.functions:
        RULE_OF[_function] = _rule

# Python values that depend on tensor values: the replay returns what the recording saw, so
# that a forward's control flow takes the same path.
VALUE_FUNCTIONS = frozenset(
    _functions(*(_method(n) for n in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__",
                                       "numpy", "__array__", "__format__", "__repr__")))
)

# Questions about a tensor rather than operations on its values (shape, dtype, storage), and
# `detach`, whose result carries no derivative: they run as they are and are not steps of the tape,
# so that code that only looks (a hook counting accuracy, an assertion on a shape) cannot change it.
OBSERVING_FUNCTIONS = frozenset(
    _functions(*(_method(n) for n in ("size", "dim", "ndimension", "numel", "nelement", "stride", "data_ptr",
                                       "storage_offset", "element_size", "is_contiguous", "is_floating_point",
                                       "is_complex", "get_device", "__len__", "detach", "untyped_storage",
                                       "has_names")), torch.is_floating_point, torch.numel)
)


def is_observing(func) -> bool:
    """A metadata query or detach (see OBSERVING_FUNCTIONS); attribute reads (x.shape, x.dtype)
    arrive as a getset descriptor's __get__."""
    return func in OBSERVING_FUNCTIONS or getattr(func, "__name__", None) == "__get__"


# Names of operations that draw random numbers: the general route would draw new ones.
RANDOM_MARKERS = ("dropout", "rrelu", "bernoulli", "rand", "normal", "multinomial", "poisson")


def function_name(func) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "fn" and hasattr(func, "__qualname__"):  # F.max_pool2d is a boolean_dispatch wrapper
        name = func.__qualname__
    return name


_AUGMENTED = frozenset(f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
                                                  "and", "or", "xor", "lshift", "rshift"))


def is_in_place(func) -> bool:
    name = function_name(func)
    return (name.endswith("_") and not name.endswith("__")) or name in _AUGMENTED or name == "__setitem__"


def is_random(func) -> bool:
    name = function_name(func).lower()
    return any(marker in name for marker in RANDOM_MARKERS)


def elementwise_slope(rule: Rule, args, kwargs) -> float | None:
    return _leaky_slope(args, kwargs) if rule.name == "leaky_relu" else None


def table() -> list[tuple[str, str, str, str]]:
    """(operation, kind, what the linearized pass does, note) for every rule, for docs and the CLI."""
    what = {
        "weight": "h ↦ W ⋆ h (bias dropped)",
        "piecewise": "h ↦ f'(a) ⊙ h, f' locally constant",
        "smooth": "h ↦ f'(a) ⊙ h, f' held at the recorded point",
        "pooling": "h ↦ h at the recorded argmax",
        "dropout": "h ↦ mask ⊙ h, the recorded mask",
        "batch-norm": "h ↦ γ/√(σ²+ε) ⊙ h, statistics held",
        "additive": "constants dropped",
        "scaling": "h ↦ h · c",
        "structural": "h ↦ op(h)",
        "general": "jvp of the call at the recorded point",
    }
    return [(rule.name, rule.kind, what[rule.kind], rule.note) for rule in RULES]


def layers_markdown() -> str:
    """The rule table and what each method holds constant, as the README shows them
    (`robustbp layers` prints it; a test keeps the README equal to it)."""
    from .methods.base import available, method_class

    lines = ["| operation | kind | linearized pass | note |", "|---|---|---|---|"]
    lines += [f"| {name} | {kind} | {what} | {note} |" for name, kind, what, note in table()]
    lines += ["| anything else | general | jvp of the call at the recorded point | "
              "refused: random draws, writes in place, custom autograd.Function, torch.compile |", ""]
    lines += ["| method | holds constant |", "|---|---|"]
    lines += [f"| `{name}` | {method_class(name).holds_constant} |" for name in available()]
    return "\n".join(lines)
