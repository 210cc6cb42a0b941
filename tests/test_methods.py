"""Every method's parameter gradient against an independent plain-autograd reference (float64)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import robustbp.methods as methods
from robustbp.layers import Normalize
from robustbp.methods.linbp import linbp_backward, relu_calls
from robustbp.methods.tangent import image_tangents
from robustbp.passes import NotLinearizable

from .reference import Reference, Residual, relative_error

TOLERANCE = 1e-5


def mlp():
    return nn.Sequential(
        Normalize(0.5, 0.25), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)
    )


def mlp_smooth():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10), nn.Sigmoid(), nn.Linear(10, 4))


def cnn():
    return nn.Sequential(
        Normalize(0.4, 0.3), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3),
        nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(16, 5),
    )


def dropout_net():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)
    )


def batchnorm_net():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(48, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 5),
    )


def residual_net():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        Residual(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))),
        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 5),
    )


ARCHITECTURES = {
    "mlp": (mlp, (4, 4)),
    "mlp-smooth": (mlp_smooth, (4, 4)),
    "cnn": (cnn, (8, 8)),
    "dropout": (dropout_net, (4, 4)),
    "batchnorm": (batchnorm_net, (8, 8)),
    "residual": (residual_net, (6, 6)),
}
PIECEWISE_LINEAR = ["mlp", "cnn", "dropout", "batchnorm", "residual"]


def build(name, seed=0, train=True):
    make, (height, width) = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = make().double().train(train)
    for m in model.modules():  # non-trivial BatchNorm affine parameters and running statistics
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(5, 1, height, width, generator=generator, dtype=torch.float64)
    classes = model(x).shape[1]
    y = torch.randint(0, classes, (5,), generator=generator)
    return model, x, y


def method_grads(model, method, x, y, seed=123):
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    stats = method.backward(model, x, y)
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()], stats


def reference_for(model, x, y, seed=123):
    torch.manual_seed(seed)
    return Reference(copy.deepcopy(model), x, y)


CASES = {
    "standard": ({}, lambda r: r.grad(r.main_loss())),
    "loss-ibp-p1": (dict(name="loss-ibp", beta=0.3, p=1), lambda r: r.loss_ibp(0.3, 1)),
    "loss-ibp-p2": (dict(name="loss-ibp", beta=0.7, p=2), lambda r: r.loss_ibp(0.7, 2)),
    "double-backprop-p1": (dict(name="double-backprop", beta=0.3, p=1), lambda r: r.double_backprop(0.3, 1)),
    "double-backprop-p2": (dict(name="double-backprop", beta=0.7, p=2), lambda r: r.double_backprop(0.7, 2)),
    "prediction-ibp-sign": (dict(name="prediction-ibp", beta=0.2), lambda r: r.prediction_ibp(0.2, "sign")),
    "prediction-ibp-grad": (
        dict(name="prediction-ibp", beta=2.0, direction="grad"), lambda r: r.prediction_ibp(2.0, "grad")
    ),
    "adversarial-sign": (
        dict(name="adversarial", eps=0.1, alpha=0.3), lambda r: r.adversarial(0.1, 0.3, "sign")
    ),
    "adversarial-grad-fast": (
        dict(name="adversarial", eps=0.5, norm="grad", variant="fast"), lambda r: r.adversarial(0.5, 0.0, "grad")
    ),
    "adversarial-backprop": (dict(name="adversarial-backprop", eps=0.08), lambda r: r.adversarial(0.08, 0.0, "sign")),
    "linbp-all": (dict(name="linbp", first=1), lambda r: r.linbp(1)),
    "linbp-second": (dict(name="linbp", first=2), lambda r: r.linbp(2)),
}


def _method(spec):
    spec = dict(spec) or {"name": "standard"}
    return methods.get(spec.pop("name"), **spec)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_matches_reference(case, architecture):
    spec, reference = CASES[case]
    model, x, y = build(architecture)
    if case.startswith("linbp") and relu_calls(model, x) < spec["first"]:
        with pytest.raises(ValueError, match="ReLU"):
            _method(spec).backward(model, x, y)
        return
    got, _ = method_grads(model, _method(spec), x, y)
    want = reference(reference_for(model, x, y))
    assert relative_error(got, want) <= TOLERANCE


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("beta", [0.05, 1.5])
def test_tangent_prop_matches_reference(architecture, beta):
    model, x, y = build(architecture)
    tangents = image_tangents(x, sigma=1.0)
    got, _ = method_grads(model, methods.get("tangent-prop", beta=beta, sigma=1.0), x, y)
    assert relative_error(got, reference_for(model, x, y).tangent_prop(beta, tangents)) <= TOLERANCE
    got, _ = method_grads(model, methods.get("fast-tangent-prop", beta=beta, sigma=1.0), x, y)
    assert relative_error(got, reference_for(model, x, y).fast_tangent_prop(beta, tangents)) <= TOLERANCE


def test_user_tangents():
    model, x, y = build("mlp")
    directions = torch.randn(3, *x.shape[1:], dtype=x.dtype)
    tangents = lambda inp: directions.expand(inp.shape[0], *directions.shape)  # noqa: E731
    got, _ = method_grads(model, methods.get("tangent-prop", beta=0.5, tangents=tangents), x, y)
    want = reference_for(model, x, y).tangent_prop(0.5, tangents(x))
    assert relative_error(got, want) <= TOLERANCE


def _draw_after_masks(model, x, y, seed, draw):
    """Random vectors drawn by the reference in the same order as the method: masks first."""
    reference = reference_for(model, x, y, seed)
    reference.main_loss()
    return reference, draw()


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("n_proj", [1, 3, -1])
def test_jacobian_frobenius_matches_reference(architecture, n_proj):
    model, x, y = build(architecture)
    got, _ = method_grads(model, methods.get("jacobian-frobenius", beta=0.4, n_proj=n_proj), x, y)
    classes = model(x).shape[1]
    if n_proj == -1:
        reference = reference_for(model, x, y)
        projections = torch.eye(classes, dtype=x.dtype).unsqueeze(1).expand(classes, x.shape[0], classes)
    else:
        reference, projections = _draw_after_masks(
            model, x, y, 123, lambda: torch.randn(n_proj, x.shape[0], classes, dtype=x.dtype)
        )
        projections = projections / projections.norm(dim=2, keepdim=True)
    assert relative_error(got, reference.jacobian_frobenius(0.4, projections)) <= TOLERANCE


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("n_iter", [1, 3])
def test_jacobian_spectral_matches_reference(architecture, n_iter):
    model, x, y = build(architecture)
    got, _ = method_grads(model, methods.get("jacobian-spectral", beta=0.4, n_iter=n_iter), x, y)
    reference, v0 = _draw_after_masks(model, x, y, 123, lambda: torch.randn_like(x))
    assert relative_error(got, reference.jacobian_spectral(0.4, v0, n_iter)) <= TOLERANCE


def test_weight_decay_matches_reference():
    model, x, y = build("batchnorm")
    got, stats = method_grads(model, methods.get("weight-decay", beta=0.01), x, y)
    reference = reference_for(model, x, y)
    weights = [m.weight for m in reference.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    want = reference.grad(reference.main_loss() + 0.01 * sum((w ** 2).sum() for w in weights))
    assert relative_error(got, want) <= TOLERANCE
    assert stats.reg_loss == pytest.approx(0.01 * sum(float((w.detach() ** 2).sum()) for w in weights), rel=1e-12)


def test_spectral_bound_converges_to_exact_singular_values():
    """After enough steps of one power iteration each, the penalty is Σ σ_max(W)² and its
    gradient 2β σ u vᵀ from the exact singular vectors."""
    model, x, y = build("cnn")
    method = methods.get("spectral-bound", beta=0.1)
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    for _ in range(200):
        model.zero_grad()
        stats = method.backward(model, x, y)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    exact = []
    reference = Reference(model, x, y)
    main_grads = reference.grad(reference.main_loss())
    for layer in layers:
        u, s, vh = torch.linalg.svd(layer.weight.detach().reshape(layer.weight.shape[0], -1))
        exact.append((layer, s[0], torch.outer(u[:, 0], vh[0])))
    assert stats.reg_loss == pytest.approx(0.1 * sum(float(s ** 2) for _, s, _ in exact), rel=1e-8)
    params = list(model.parameters())
    for layer, sigma, outer in exact:
        index = next(i for i, p in enumerate(params) if p is layer.weight)
        penalty_grad = layer.weight.grad - main_grads[index]
        want = 2 * 0.1 * sigma * outer.reshape(layer.weight.shape)
        assert relative_error([penalty_grad], [want]) <= 1e-6


@pytest.mark.parametrize("name", ["loss-ibp", "double-backprop", "prediction-ibp", "tangent-prop",
                                  "fast-tangent-prop", "jacobian-frobenius", "jacobian-spectral",
                                  "weight-decay", "spectral-bound"])
@pytest.mark.parametrize("architecture", ["cnn", "dropout", "batchnorm"])
def test_zero_beta_is_standard(name, architecture):
    model, x, y = build(architecture)
    got, stats = method_grads(model, methods.get(name, beta=0.0), x, y)
    want, standard_stats = method_grads(model, methods.get("standard"), x, y)
    assert relative_error(got, want) <= 1e-12
    assert stats.reg_loss == 0.0 and stats.main_loss == pytest.approx(standard_stats.main_loss, rel=1e-12)


@pytest.mark.parametrize("name", ["adversarial", "adversarial-backprop"])
def test_zero_eps_is_standard(name):
    model, x, y = build("cnn")
    got, _ = method_grads(model, methods.get(name, eps=0.0), x, y)
    want, _ = method_grads(model, methods.get("standard"), x, y)
    assert relative_error(got, want) <= 1e-12


@pytest.mark.parametrize("architecture", ["mlp", "cnn", "residual"])
@pytest.mark.parametrize("p", [1, 2])
def test_loss_ibp_and_double_backprop_differ_by_loss_curvature(architecture, p):
    """For piecewise-linear networks, double backprop = Loss IBP + the gradient of the penalty
    through ∂ℓ/∂z alone (the loss layer's curvature), and that term is not zero."""
    model, x, y = build(architecture, train=False)
    ibp, _ = method_grads(model, methods.get("loss-ibp", beta=0.5, p=p), x, y)
    dbp, _ = method_grads(model, methods.get("double-backprop", beta=0.5, p=p), x, y)
    curvature = reference_for(model, x, y).curvature_term(0.5, p)
    difference = [d - i for d, i in zip(dbp, ibp)]
    assert relative_error(difference, curvature) <= TOLERANCE
    standard, _ = method_grads(model, methods.get("standard"), x, y)
    penalty_part = torch.cat([(d - s).flatten() for d, s in zip(dbp, standard)])
    assert torch.cat([c.flatten() for c in curvature]).norm() > 0.01 * penalty_part.norm()


def test_stats_report_the_objective():
    model, x, y = build("cnn", train=False)
    _, stats = method_grads(model, methods.get("loss-ibp", beta=0.3, p=2), x, y)
    reference = reference_for(model, x, y)
    g = reference.held_input_grads()
    assert stats.main_loss == pytest.approx(float(reference.main_loss()), rel=1e-12)
    assert stats.reg_loss == pytest.approx(float(0.3 * (g ** 2).sum(1).mean() / 2), rel=1e-10)
    assert stats.loss == pytest.approx(stats.main_loss + stats.reg_loss, rel=1e-12)


@pytest.mark.parametrize("name", methods.available())
@pytest.mark.parametrize("train", [True, False])
def test_mode_is_left_as_found(name, train):
    model, x, y = build("batchnorm", train=train)
    model[1].eval()  # a mixed model: one BatchNorm frozen, the other training
    modes = [m.training for m in model.modules()]
    methods.get(name).backward(model, x, y)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("name", sorted(set(methods.available()) - {"spectral-bound"}))
def test_gradients_add_to_what_is_there(name):
    """Two calls on the same batch leave twice the gradient of one, as loss.backward() does.
    (spectral-bound is left out: its power-iteration vectors move between calls.)"""
    model, x, y = build("batchnorm", train=False)
    torch.manual_seed(5)
    once, _ = method_grads(model, methods.get(name), x, y, seed=5)
    method = methods.get(name)
    torch.manual_seed(5)
    method.backward(model, x, y)
    torch.manual_seed(5)
    method.backward(model, x, y)
    assert relative_error([p.grad for p in model.parameters()], [2 * g for g in once]) <= 1e-12


def test_fallback_module_gives_the_same_gradient():
    """A parameter-free module the passes have no rule for is linearized by torch.func.jvp at its
    recorded input: Loss IBP through it matches the reference with its derivative held constant."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Softplus(), nn.Linear(12, 4)).double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    got, _ = method_grads(model, methods.get("loss-ibp", beta=0.5, p=2), x, y)
    assert relative_error(got, reference_for(model, x, y).loss_ibp(0.5, 2)) <= TOLERANCE


def test_explicit_rules_agree_with_fallback():
    """The efficient path (explicit ReLU and max-pool rules) and the general path (torch.func.jvp
    for a module the passes do not know) give the same Loss IBP gradient."""

    class OpaqueReLU(nn.Module):
        def forward(self, x):
            return torch.relu(x)

    class OpaqueMaxPool(nn.Module):
        def forward(self, x):
            return nn.functional.max_pool2d(x, 2)

    model, x, y = build("cnn", train=False)
    opaque = copy.deepcopy(model)
    opaque[2], opaque[3] = OpaqueReLU(), OpaqueMaxPool()
    for p in (1, 2):
        explicit, _ = method_grads(model, methods.get("loss-ibp", beta=0.5, p=p), x, y)
        general, _ = method_grads(opaque, methods.get("loss-ibp", beta=0.5, p=p), x, y)
        assert relative_error(explicit, general) <= 1e-10


def test_an_operation_without_forward_derivative_is_named():
    """A custom autograd.Function without a jvp has no rule and no general route: one clear error
    that names it, from every method that replays the network linearly."""

    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x ** 3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * grad

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(16, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.second(Cube.apply(self.first(x.flatten(1))))

    x, y = torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])
    for name in ("loss-ibp", "fast-tangent-prop", "jacobian-spectral"):
        with pytest.raises(NotLinearizable, match="Cube"):
            methods.get(name).backward(Custom(), x, y)


def test_in_place_write_into_an_activation_is_refused():
    class Overwrite(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(16, 8), nn.Linear(8, 4)

        def forward(self, x):
            h = self.first(x.flatten(1))
            h[:, 0] = 0.0
            return self.second(h)

    with pytest.raises(NotLinearizable, match="__setitem__"):
        methods.get("loss-ibp").backward(Overwrite(), torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("architecture", ["batchnorm", "residual", "dropout"])
@pytest.mark.parametrize("case", ["loss-ibp-p1", "loss-ibp-p2", "double-backprop-p2", "prediction-ibp-sign", "linbp-all"])
def test_gradient_matches_reference_in_eval_mode(case, architecture):
    """BatchNorm with running statistics (the fused IBP path) and Dropout switched off."""
    spec, reference = CASES[case]
    model, x, y = build(architecture, train=False)
    got, _ = method_grads(model, _method(spec), x, y)
    assert relative_error(got, reference(reference_for(model, x, y))) <= TOLERANCE


def test_functional_nonlinearities_in_forward():
    """torch.relu called in forward is an operation like nn.ReLU: every method follows it."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(16, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.second(torch.relu(self.first(x.flatten(1))))

    torch.manual_seed(0)
    model = Functional().double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    for name, reference in (("loss-ibp-p2", lambda r: r.loss_ibp(0.7, 2)),
                            ("double-backprop-p2", lambda r: r.double_backprop(0.7, 2)),
                            ("prediction-ibp-sign", lambda r: r.prediction_ibp(0.2, "sign"))):
        spec, _ = CASES[name]
        got, _ = method_grads(model, _method(spec), x, y)
        assert relative_error(got, reference(reference_for(model, x, y))) <= TOLERANCE


@pytest.mark.parametrize("name", methods.available())
def test_gradients_reach_grad_through_autograd(name):
    """Every change to .grad goes through autograd's accumulation, so post-accumulate hooks
    (which DistributedDataParallel's all-reduce uses) see the final gradient of every parameter."""
    model, x, y = build("cnn", train=False)
    last_seen = {}
    for index, param in enumerate(model.parameters()):
        param.register_post_accumulate_grad_hook(lambda p, index=index: last_seen.__setitem__(index, p.grad.clone()))
    torch.manual_seed(3)
    methods.get(name).backward(model, x, y)
    params = list(model.parameters())
    assert sorted(last_seen) == list(range(len(params)))
    assert all(torch.equal(last_seen[i], p.grad) for i, p in enumerate(params))


@pytest.mark.parametrize("name", ["standard", "loss-ibp", "prediction-ibp", "adversarial", "linbp"])
def test_a_model_returning_a_tuple_gets_one_clear_error(name):
    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            hidden = x.flatten(1)
            return self.fc(hidden).relu(), hidden

    with pytest.raises(ValueError, match="must return a tensor of logits.*returned a tuple"):
        methods.get(name).backward(TupleOut(), torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]))


def test_one_logit_with_cross_entropy_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    with pytest.raises(ValueError, match="one logit per sample"):
        methods.get("standard").backward(model, torch.rand(3, 1, 4, 4), torch.tensor([0, 0, 0]))


def test_int32_labels_are_accepted_and_an_empty_batch_refused():
    model, x, y = build("mlp")
    got, _ = method_grads(model, methods.get("loss-ibp"), x, y.int())
    want, _ = method_grads(model, methods.get("loss-ibp"), x, y)
    assert relative_error(got, want) == 0.0
    with pytest.raises(ValueError, match="the batch is empty"):
        methods.get("standard").backward(model, x[:0], y[:0])


def test_stats_count_the_clean_batch_correct():
    model, x, y = build("cnn", train=False)
    correct = int((model(x).argmax(1) == y).sum())
    for name in methods.available():
        assert methods.get(name).backward(copy.deepcopy(model), x, y).correct == correct, name


def test_linbp_refuses_a_model_without_relu_and_differs_with_relu():
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    smooth, _, _ = build("mlp-smooth")
    with pytest.raises(ValueError, match="applies no ReLU"):
        with linbp_backward(smooth):
            smooth(x)
    relu_model, _, _ = build("mlp")
    (bp,) = torch.autograd.grad(relu_model(x).pow(2).sum(), x)
    with linbp_backward(relu_model, first=1):
        out = relu_model(x)
    (lin,) = torch.autograd.grad(out.pow(2).sum(), x)
    assert not torch.allclose(bp, lin)
    assert torch.equal(out, relu_model(x))  # forward values unchanged
    with pytest.raises(ValueError, match="only 2 ReLU"):
        with linbp_backward(relu_model, first=3):
            relu_model(x)


def _batch():
    model, x, y = build("cnn", train=False)
    return model, x, y


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m, x, y: (m, x, y[:-1]), "same number of samples"),
        (lambda m, x, y: (m, x, y + 10), r"labels must lie in \[0, 5\)"),
        (lambda m, x, y: (m, (x * 255).long(), y), "floating-point"),
        (lambda m, x, y: (m, x.index_fill(0, torch.tensor([1]), float("nan")), y), "NaN or Inf"),
        (lambda m, x, y: (m, x, y.double()), "integer tensor"),
        (lambda m, x, y: (m.requires_grad_(False), x, y), "no trainable parameters"),
    ],
)
@pytest.mark.parametrize("name", methods.available())
def test_bad_batches_get_one_clear_error(name, change, message):
    model, x, y = change(*_batch())
    with pytest.raises(ValueError, match=message):
        methods.get(name).backward(model, x, y)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("loss-ibp", dict(beta=-0.1), "loss-ibp: beta must be a finite number >= 0, got -0.1"),
        ("loss-ibp", dict(p=3), "loss-ibp: p must be one of 1, 2, got 3"),
        ("double-backprop", dict(p=0), "p must be one of 1, 2"),
        ("adversarial", dict(eps=-1), "adversarial: eps must be a finite number >= 0"),
        ("adversarial-backprop", dict(eps=float("nan")), "eps must be a finite number >= 0"),
        ("adversarial", dict(norm="l3"), "adversarial: norm must be one of"),
        ("adversarial", dict(variant="slow"), "variant must be one of"),
        ("adversarial", dict(alpha=2), "adversarial: alpha must lie in"),
        ("jacobian-frobenius", dict(n_proj=0), "n_proj must be"),
        ("jacobian-spectral", dict(n_iter=0), "n_iter must be"),
        ("tangent-prop", dict(sigma=0), "sigma"),
        ("prediction-ibp", dict(direction="up"), "direction must be one of"),
        ("linbp", dict(first=0), "first must be"),
        ("standard", dict(beta=0.1), "has no parameter 'beta'"),
        ("loss-ibp", dict(beta="abc"), "loss-ibp: beta must be a number >= 0, got 'abc'"),
        ("loss-ibp", dict(beta=None), "loss-ibp: beta must be a number >= 0, got None"),
        ("loss-ibp", dict(beta=float("inf")), "loss-ibp: beta must be a finite number >= 0, got inf"),
        ("adversarial", dict(clip=1), "adversarial: clip must be a pair"),
        ("adversarial", dict(clip=(1, 0)), "adversarial: clip must be a pair .* low < high"),
        ("tangent-prop", dict(tangents=3), "tangent-prop: tangents must be a function"),
        ("jacobian-frobenius", dict(n_proj=-2), "n_proj must be an integer >= 1, or -1"),
        ("no-such-method", {}, "unknown method 'no-such-method'; available: adversarial"),
    ],
)
def test_bad_parameters_get_one_clear_error(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        methods.get(name, **kwargs)


def test_loss_fn_must_be_per_sample():
    model, x, y = _batch()
    method = methods.get("loss-ibp", loss_fn=lambda z, t: nn.functional.cross_entropy(z, t))
    with pytest.raises(ValueError, match="reduction='none'"):
        method.backward(model, x, y)


def test_registry_lists_every_method_of_the_papers():
    assert set(methods.available()) >= {
        "standard", "loss-ibp", "double-backprop", "prediction-ibp", "tangent-prop", "fast-tangent-prop",
        "adversarial", "adversarial-backprop", "jacobian-frobenius", "jacobian-spectral", "spectral-bound",
        "weight-decay", "linbp",
    }
    assert set(ARCHITECTURES) >= {"mlp", "cnn", "dropout", "batchnorm", "residual"}


def test_adversarial_moves_batchnorm_running_statistics_once_per_step():
    """The forward at x* uses the batch's statistics but leaves the running ones to the clean pass."""
    model, x, y = build("batchnorm")
    standard_model, adversarial_model = copy.deepcopy(model), copy.deepcopy(model)
    methods.get("standard").backward(standard_model, x, y)
    methods.get("adversarial", eps=0.1).backward(adversarial_model, x, y)
    for a, b in zip(standard_model.buffers(), adversarial_model.buffers()):
        assert torch.equal(a, b)


def test_parameters_are_declared_once():
    """parameters_of, the command line's options and bench's defaults come from the declarations."""
    assert methods.parameters_of("loss-ibp") == {"beta": 0.01, "p": 1}
    help_texts = methods.parameter_help()
    parse, text, takers = help_texts["p"]
    assert parse is int and "norm" in text and ("loss-ibp", 1) in takers and ("double-backprop", 1) in takers
    assert help_texts["tangents"][0] is None  # a function: settable from Python only
    assert "loss-ibp:p=2" in methods.bench_specs() and "adversarial:variant=fast" in methods.bench_specs()
    assert set(methods.available()) <= set(methods.bench_specs())
    assert repr(methods.get("loss-ibp", beta=0.5)) == "LossIBP(beta=0.5, p=1)"


def test_methods_declare_their_persistent_state():
    model, x, y = build("cnn")
    bound = methods.get("spectral-bound", beta=0.1)
    bound.backward(model, x, y)
    state = bound.state_dict(model)
    assert set(state) == {"1.weight", "4.weight", "7.weight"}
    restored = methods.get("spectral-bound", beta=0.1)
    restored.load_state_dict(model, state)
    assert all(torch.equal(restored.state_dict(model)[k], v) for k, v in state.items())
    assert methods.get("loss-ibp").state_dict(model) == {}
    with pytest.raises(ValueError, match="keeps no state"):
        methods.get("loss-ibp").load_state_dict(model, state)
