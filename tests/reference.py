"""Independent references for the method tests: plain torch.autograd / torch.func from each definition.

Nothing here uses robustbp's passes or the methods' internals. Every definition runs the MODEL'S
OWN forward, model(x), under a torch.overrides.TorchFunctionMode (`HeldForward`) that knows
which tensors are activations (x and every floating output of a call that received an
activation; strong references are kept, so ids are not reused) and changes only this:

  - dropout: F.dropout / dropout1d / dropout2d / dropout3d (and torch.dropout,
    torch.feature_dropout) with training=True and p > 0 on an activation multiply by a mask.
    The first forward of a Reference draws it as F.dropoutX(torch.ones_like(input), p, True),
    which consumes the global RNG exactly as the native op does on CPU; later forwards of the
    same Reference reuse the masks in call order. With training=False or p = 0: the identity.
  - frozen statistics (`freeze_statistics`): F.batch_norm with training=True normalizes with the
    batch mean and biased variance DETACHED (running statistics are left alone). Without the flag
    BatchNorm runs as is (the main loss, samples coupled).
  - held derivatives (`freeze_derivatives`): every call that takes an activation is replaced by its
    first-order expansion at the detached point, out = f(ā) + jvp_ā f·(a − ā), ā = a.detach(),
    computed with torch.func.jvp of a closure over the call; non-activation arguments (parameters,
    `weight * mask`, buffers) stay in the closure, live. Same value and same first derivative in
    x; the derivative no longer depends on the point (nonlinearities' derivatives held), but still
    on the parameters used inside the call. Non-floating outputs are f(ā). Metadata calls
    (.shape, .size(), ...) and view/reshape ops (linear, so their own expansion, and run as
    themselves to keep aliasing) pass through. Calls in place (relu_, add_, +=, inplace=True)
    use the out-of-place op and then copy the result into the first argument.
    BatchNorm in training with frozen statistics is applied first (it is then affine).
  - LinBP (`linbp_first=k`): every ReLU call on an activation, however written (F.relu,
    torch.relu, Tensor.relu, relu_, nn.ReLU incl. inplace=True), from the k-th on (1-based,
    forward order) becomes a + (relu(a) − a).detach() (value relu(a), derivative 1).
Everything runs under the MATH scaled-dot-product-attention backend (the fused CPU kernel has
neither forward-mode AD nor double backward). Per-sample Jacobians J_i = ∂z_i/∂x_i are formed
class by class, ∂(Σ_b z_b,c)/∂x with create_graph=True: exact once batch statistics are frozen,
since then nothing couples the samples (test_any_model checks it against the full Jacobian);
without frozen statistics the full torch.autograd.functional.jacobian is used.
`adversarial` runs the model's own forward natively (nn.Dropout then draws its masks as in training).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten


class Residual(nn.Module):
    """x + body(x): a residual block written with a plain addition in forward."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


_DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d}
_NATIVE_DROPOUTS = {torch.dropout, torch.feature_dropout}
# Calls that only read metadata, and parameter-free view/reshape ops (linear in their one tensor,
# so the first-order expansion is the op itself; running them natively keeps aliasing for writes
# through views). They run as themselves in every mode.
_PASS_THROUGH = {
    "__get__", "size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset", "is_contiguous",
    "is_floating_point", "is_complex", "element_size", "get_device", "data_ptr", "__len__", "__bool__",
    "__int__", "__float__", "__index__", "item", "tolist", "__repr__", "__str__", "__format__", "type",
    "requires_grad_", "retain_grad", "register_hook", "untyped_storage", "has_names", "__hash__",
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
    "t", "permute", "movedim", "moveaxis", "swapaxes", "swapdims", "expand", "expand_as", "narrow", "select",
    "__getitem__", "__setitem__", "chunk", "split", "split_with_sizes", "tensor_split", "unbind", "contiguous",
    "detach", "diagonal", "unfold", "as_strided",
}
# In-place ops that are affine in their tensors (or do not depend on them): run as themselves.
_NATIVE_IN_PLACE = {"copy_", "zero_", "fill_", "requires_grad_", "detach_", "set_", "resize_", "share_memory_"}
_IN_PLACE_DUNDERS = {
    "__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__", "__itruediv__": "__truediv__",
    "__ifloordiv__": "__floordiv__", "__ipow__": "__pow__", "__imatmul__": "__matmul__",
}
_SIGNATURES: dict = {}


def _bind(func, args, kwargs):
    """inspect.BoundArguments of a Python-level function (None for builtins)."""
    if func not in _SIGNATURES:
        try:
            _SIGNATURES[func] = inspect.signature(func)
        except (TypeError, ValueError):
            _SIGNATURES[func] = None
    signature = _SIGNATURES[func]
    if signature is None:
        return None
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound


class HeldForward(TorchFunctionMode):
    """model(x) with dropout masks drawn once, and optionally frozen statistics, held derivatives
    and LinBP's ReLU (see the module docstring)."""

    def __init__(self, x, masks, freeze_derivatives=False, freeze_statistics=False, linbp_first=None):
        super().__init__()
        self.activations = {id(x): x}  # strong references: ids stay unique while the mode lives
        self.masks, self.mask_index = masks, 0
        self.freeze_derivatives, self.freeze_statistics = freeze_derivatives, freeze_statistics
        self.linbp_first = linbp_first
        self.relu_calls = 0

    def is_activation(self, value) -> bool:
        return isinstance(value, torch.Tensor) and self.activations.get(id(value)) is value

    def track(self, out):
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                self.activations[id(leaf)] = leaf

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(self.is_activation(leaf) for leaf in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)
        out = self.call(func, args, kwargs)
        self.track(out)
        name = getattr(func, "__name__", "")
        if name in _IN_PLACE_DUNDERS or name == "__setitem__" or (name.endswith("_") and not name.startswith("__")):
            self.track(args[0])  # written in place with something that depends on x
        return out

    # ---- the changed calls ----
    def call(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        if func in _DROPOUTS or func in _NATIVE_DROPOUTS:
            return self.dropout(func, args, kwargs)
        if name in ("relu", "relu_"):
            self.relu_calls += 1
            if self.linbp_first is not None and self.relu_calls >= self.linbp_first:
                return self.linbp_relu(func, args, kwargs)
        if func is F.batch_norm and self.freeze_statistics:
            bound = _bind(func, args, kwargs)
            if bound.arguments["training"]:
                return self.frozen_batch_norm(**bound.arguments)
        if not self.freeze_derivatives or name in _PASS_THROUGH:
            return func(*args, **kwargs)
        return self.expanded(func, args, kwargs)

    def dropout(self, func, args, kwargs):
        if func in _NATIVE_DROPOUTS:  # torch.dropout(input, p, train): no inplace argument
            given = dict(zip(("input", "p", "train"), args), **kwargs)
            inp, p, training, inplace = given["input"], given["p"], given["train"], False
        else:
            bound = _bind(func, args, kwargs)
            inp, p, training, inplace = (bound.arguments[k] for k in ("input", "p", "training", "inplace"))
        if not training or p == 0:
            return inp
        if self.mask_index == len(self.masks):
            self.masks.append(func(torch.ones_like(inp), p, True))  # the native op's draws, on a tensor of ones
        mask = self.masks[self.mask_index]
        self.mask_index += 1
        return inp.mul_(mask) if inplace else inp * mask

    def linbp_relu(self, func, args, kwargs):
        bound = _bind(func, args, kwargs)
        inp = args[0] if args else kwargs["input"]
        inplace = func.__name__ == "relu_" or (bound is not None and bound.arguments.get("inplace", False))
        out = inp + (torch.relu(inp) - inp).detach()
        if inplace:
            inp.copy_(out)
            return inp
        return out

    @staticmethod
    def frozen_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps):
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        mean = input.mean(dims).detach()
        var = input.var(dims, unbiased=False).detach()
        out = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
        if weight is not None:
            out = out * weight.view(shape)
        if bias is not None:
            out = out + bias.view(shape)
        return out

    def expanded(self, func, args, kwargs):
        """f(ā) + jvp_ā f·(a − ā) for the call; in place: the same, copied into the first argument."""
        name = getattr(func, "__name__", "")
        target = None
        if name in _NATIVE_IN_PLACE:
            return func(*args, **kwargs)
        if name in _IN_PLACE_DUNDERS:
            func, target = getattr(torch.Tensor, _IN_PLACE_DUNDERS[name]), args[0]
        elif name.endswith("_") and not name.startswith("__"):
            out_of_place = getattr(torch.Tensor, name[:-1], None)
            if out_of_place is None:
                raise TypeError(f"reference: no out-of-place equivalent of in-place {name}")
            func, target = out_of_place, args[0]
        else:
            bound = _bind(func, args, kwargs)
            if bound is not None and bound.arguments.get("inplace") is True:
                bound.arguments["inplace"] = False
                target = next(iter(bound.arguments.values()))
                args, kwargs = bound.args, bound.kwargs
        out = self.first_order(func, args, kwargs)
        if target is None:
            return out
        target.copy_(out)
        return target

    def first_order(self, func, args, kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if self.is_activation(leaf)]
        slot: dict[int, int] = {}
        inputs = []
        for i in positions:  # one primal per distinct activation (`query is key` stays true)
            if id(leaves[i]) not in slot:
                slot[id(leaves[i])] = len(inputs)
                inputs.append(leaves[i])
        points = tuple(a.detach().clone() for a in inputs)  # cloned: a later in-place write leaves ā alone
        tangents = tuple(a - point for a, point in zip(inputs, points))
        box = {}

        def call_at(*primals):
            filled = list(leaves)
            for i in positions:
                filled[i] = primals[slot[id(leaves[i])]]
            call_args, call_kwargs = tree_unflatten(filled, spec)
            out_leaves, out_spec = tree_flatten(func(*call_args, **call_kwargs))
            tensors = [j for j, leaf in enumerate(out_leaves) if isinstance(leaf, torch.Tensor)]
            box.update(leaves=out_leaves, spec=out_spec, tensors=tensors)
            if not tensors:
                return (primals[0].new_zeros(()),)
            return tuple(out_leaves[j] for j in tensors)

        with sdpa_kernel(SDPBackend.MATH):
            values, derivatives = torch.func.jvp(call_at, points, tangents)
        out_leaves = list(box["leaves"])
        for j, value, derivative in zip(box["tensors"], values, derivatives):
            out_leaves[j] = value + derivative if value.is_floating_point() else value
        return tree_unflatten(out_leaves, box["spec"])


class Reference:
    """One batch, one network: the definitions of every method, by plain autograd."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.model, self.y = model, y
        self.x = x.detach().clone().requires_grad_(True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.batch = x.shape[0]
        self.masks: list = []
        self.relu_calls = None  # ReLU calls on activations in the last forward

    def logits(self, x=None, **flags) -> torch.Tensor:
        x = self.x if x is None else x
        mode = HeldForward(x, self.masks, **flags)
        with sdpa_kernel(SDPBackend.MATH), mode:
            out = self.model(x)
        self.relu_calls = mode.relu_calls
        return out

    def per_sample_loss(self, logits):
        return F.cross_entropy(logits, self.y, reduction="none")

    def main_loss(self):
        return self.per_sample_loss(self.logits()).mean()

    def jacobians(self, **flags) -> torch.Tensor:
        """(B, C, D): the per-sample Jacobians J_i = ∂z_i/∂x_i, differentiable in θ."""
        return self._logits_and_jacobians(**flags)[1]

    def _logits_and_jacobians(self, **flags):
        if not flags.get("freeze_statistics"):  # samples may be coupled: the full Jacobian, its diagonal blocks
            logits = self.logits(**flags)
            with sdpa_kernel(SDPBackend.MATH):
                full = torch.autograd.functional.jacobian(
                    lambda inp: self.logits(inp, **flags), self.x, create_graph=True
                )
            index = torch.arange(self.batch)
            return logits, full.flatten(3)[index, :, index, :]
        logits = self.logits(**flags)
        rows = [
            torch.autograd.grad(logits[:, c].sum(), self.x, create_graph=True, retain_graph=True)[0].flatten(1)
            for c in range(logits.shape[1])
        ]
        return logits, torch.stack(rows, 1)

    def grad(self, objective) -> list[torch.Tensor]:
        grads = torch.autograd.grad(objective, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    # ---- the definitions ----
    def held_input_grads(self):
        """g_i = J_iᵀ δ_i with δ_i = ∂ℓ_i/∂z_i held constant, activation derivatives held constant
        and batch statistics frozen (Loss IBP's input gradient)."""
        logits = self.logits(freeze_derivatives=True, freeze_statistics=True)
        delta = (F.softmax(logits, 1) - F.one_hot(self.y, logits.shape[1]).to(logits.dtype)).detach()
        return torch.autograd.grad(logits, self.x, delta, create_graph=True)[0].flatten(1)

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
        logits, jac = self._logits_and_jacobians(freeze_statistics=True)
        delta = F.softmax(logits, 1) - F.one_hot(self.y, logits.shape[1]).to(logits.dtype)
        g = torch.einsum("bcd,bc->bd", jac.detach(), delta)
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
        """Through the model's own forward, natively: nn.Dropout then draws its masks as in training."""
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
    got_flat = torch.cat([g.detach().flatten() for g in got])
    want_flat = torch.cat([w.detach().flatten() for w in want])
    return float((got_flat - want_flat).norm() / want_flat.norm().clamp_min(1e-300))
