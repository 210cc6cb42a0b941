"""The linearized network, the power iteration, LinBP's switch, and the errors at the boundary."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import robustbp.methods as methods
from robustbp.methods.linbp import linbp_backward
from robustbp.passes import Linearization
from robustbp.power_iteration import spectral_norm_estimate

from .test_methods import ARCHITECTURES, build


def exact_spectral_norms(model, x):
    """σ_max of each sample's full Jacobian: torch.func.jacrev + matrix 2-norm."""
    norms = []
    for sample in x:
        jac = torch.func.jacrev(lambda inp: model(inp.unsqueeze(0)).squeeze(0))(sample)
        norms.append(torch.linalg.matrix_norm(jac.reshape(jac.shape[0], -1), ord=2))
    return torch.stack(norms)


@pytest.mark.parametrize("architecture", ["mlp", "mlp-smooth", "cnn", "batchnorm", "residual"])
def test_linearized_forward_is_the_jacobian_vector_product(architecture):
    model, x, _ = build(architecture, train=False)
    h = torch.randn_like(x)
    lin = Linearization.record(model, x)
    _, want = torch.func.jvp(model, (x,), (h,))
    assert torch.allclose(lin.jvp(h), want, rtol=1e-10, atol=1e-12)
    stacked = torch.cat([h, 2 * h, -h])  # three tangents per sample, rows t·B + i
    assert torch.allclose(lin.jvp(stacked), torch.cat([want, 2 * want, -want]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("architecture", ["mlp", "mlp-smooth", "cnn", "residual"])
def test_power_iteration_reaches_the_exact_spectral_norm(architecture):
    model, x, _ = build(architecture, train=False)
    exact = exact_spectral_norms(model, x)
    estimate = spectral_norm_estimate(model, x, n_iter=20, generator=torch.Generator().manual_seed(0))
    assert torch.all((estimate - exact).abs() <= 0.01 * exact)
    one_step = spectral_norm_estimate(model, x, n_iter=1, generator=torch.Generator().manual_seed(0))
    assert torch.all(one_step <= exact * (1 + 1e-9))  # a power-iteration estimate never exceeds σ_max


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
        ("loss-ibp", dict(p=3), "p must be 1 or 2"),
        ("double-backprop", dict(p=0), "p must be 1 or 2"),
        ("adversarial", dict(eps=-1), "adversarial: eps must be a finite number >= 0"),
        ("adversarial-backprop", dict(eps=float("nan")), "eps must be a finite number >= 0"),
        ("adversarial", dict(norm="l3"), "norm must be"),
        ("adversarial", dict(variant="slow"), "variant must be"),
        ("adversarial", dict(alpha=2), "alpha must lie"),
        ("jacobian-frobenius", dict(n_proj=0), "n_proj must be"),
        ("jacobian-spectral", dict(n_iter=0), "n_iter must be"),
        ("tangent-prop", dict(sigma=0), "sigma"),
        ("prediction-ibp", dict(direction="up"), "direction must be"),
        ("linbp", dict(first=0), "first must be"),
        ("standard", dict(beta=0.1), "has no parameter 'beta'"),
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


def test_registry_lists_every_method_of_the_issue():
    assert set(methods.available()) >= {
        "standard", "loss-ibp", "double-backprop", "prediction-ibp", "tangent-prop", "fast-tangent-prop",
        "adversarial", "adversarial-backprop", "jacobian-frobenius", "jacobian-spectral", "spectral-bound",
        "weight-decay", "linbp",
    }
    assert set(ARCHITECTURES) >= {"mlp", "cnn", "dropout", "batchnorm", "residual"}


def test_exact_replay_through_layer_norm_matches_finite_differences():
    """The exact replay's J·v through LayerNorm, differentiated in the weights before it, against
    central finite differences (PyTorch's fused layer_norm gets this third-order term wrong, so the
    replay uses an elementary-operation LayerNorm; the IBP replay needs no such term)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.rand(4, 6, dtype=torch.float64)
    v = torch.randn(4, 6, dtype=torch.float64)
    weight = model[0].weight

    def penalty():
        lin = Linearization.record(model, x.clone().requires_grad_(True))
        return lin.jvp(v, exact=True).pow(2).sum()

    (got,) = torch.autograd.grad(penalty(), weight)
    step, numeric = 1e-6, torch.zeros_like(weight)
    with torch.no_grad():
        for index in range(weight.numel()):
            original = weight.view(-1)[index].item()
            weight.view(-1)[index] = original + step
            up = penalty()
            weight.view(-1)[index] = original - step
            down = penalty()
            weight.view(-1)[index] = original
            numeric.view(-1)[index] = (up - down) / (2 * step)
    assert float((got - numeric).norm() / numeric.norm()) <= 1e-6
