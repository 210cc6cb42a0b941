"""The linearized network (J·v against torch.func.jvp, the exact replay against finite differences) and the power iteration."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustbp.passes import Linearization
from robustbp.power_iteration import spectral_norm_estimate

from .test_methods import build


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


class _Odd(nn.Module):
    """Operations a forward may apply to activations, each one with its own route in the replay."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(16, 8), nn.Linear(12, 3)
        self.token = nn.Parameter(torch.randn(1, 4, dtype=torch.float64))
        self.register_buffer("index", torch.tensor([3, 1, 0, 2]))

    def forward(self, x):
        flat = x.flatten(1)
        hidden = self.first(flat)
        hidden = 1 - hidden + 2 * torch.div(flat[:, :8] * 10, 3, rounding_mode="floor")  # floor: derivative 0
        hidden = torch.where(hidden > 0, hidden, 0.5 * hidden.pow(2)) / 2
        picked = hidden[:, self.index]                                   # a constant index tensor
        joined = torch.cat([self.token.expand(x.shape[0], -1), picked, hidden[:, 4:].sin()], dim=1)
        if bool(joined.sum() > -1e9):                                    # control flow on a value
            joined = joined.clamp(-3, 3)
        return self.second(joined)


def test_the_replay_is_the_forward_mode_derivative_on_odd_operations():
    torch.manual_seed(0)
    model = _Odd().double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    h = torch.randn_like(x)
    lin = Linearization.record(model, x.clone().requires_grad_(True))
    _, want = torch.func.jvp(model, (x,), (h,))
    assert torch.allclose(lin.jvp(h), want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(lin.jvp(h, exact=True), want, rtol=1e-10, atol=1e-12)
    assert lin.tape.general_steps  # where, sin, clamp, indexing by a tensor: the general route
