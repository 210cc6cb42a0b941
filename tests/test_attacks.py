"""Attacks: formulas against plain autograd, constraints, LinBP, model state, ART cross-check, errors."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustbp.attacks import (
    apgd,
    art_available,
    autoattack,
    art_pgd,
    fgsm,
    gradient_noise,
    input_gradient,
    pgd,
    pgd_checkpoints,
    square,
    tpgd,
)
from robustbp.validation import MissingDependency

from .helpers import one_thread, synthetic_data, trained  # noqa: F401 (one_thread: autouse fixture)

needs_art = pytest.mark.skipif(
    not art_available(), reason="ART (adversarial-robustness-toolbox) is not importable; install robustbp[attacks]"
)


def relu_mlp(seed: int = 0, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes)
    )


@pytest.fixture(scope="module")
def data():
    return synthetic_data(300)


@pytest.fixture(scope="module")
def model(data):
    torch.set_num_threads(1)
    return trained(relu_mlp(), *data)


def success_rate(model, x, x_adv, y) -> float:
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        fooled = model(x_adv).argmax(1) != y
    return float((correct & fooled).sum() / correct.sum())


# --- formulas -------------------------------------------------------------------------------------


def test_input_gradient_is_gradient_of_summed_cross_entropy(model, data):
    x, y = data[0][:20], data[1][:20]
    x_ref = x.clone().requires_grad_(True)
    F.cross_entropy(model(x_ref), y, reduction="sum").backward()
    torch.testing.assert_close(input_gradient(model, x, y), x_ref.grad)


def test_fgsm_and_gradient_step_formulas(model, data):
    x, y = data[0][:20], data[1][:20]
    grad = input_gradient(model, x, y)
    torch.testing.assert_close(fgsm(model, x, y, 0.1), (x + 0.1 * grad.sign()).clamp(0, 1))
    torch.testing.assert_close(gradient_noise(model, x, y, 3.0, "gradient"), (x + 3.0 * grad).clamp(0, 1))
    torch.testing.assert_close(fgsm(model, x, y, 0.0), x)


def test_pgd_without_random_start_follows_the_update_rule(model, data):
    """Two L∞ steps by hand: x ← clip(clamp(x + η·sign(∇L) - x₀, -ε, ε) + x₀, 0, 1)."""
    x, y = data[0][:20], data[1][:20]
    eps, step = 0.05, 0.03
    x_hand = x.clone()
    for _ in range(2):
        x_hand = (x + (x_hand + step * input_gradient(model, x_hand, y).sign() - x).clamp(-eps, eps)).clamp(0, 1)
    x_pgd = pgd(model, x, y, eps, step, 2, random_start=False)
    torch.testing.assert_close(x_pgd, x_hand)


# --- constraints ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps, step", [("linf", 8 / 255, 3 / 255), ("l2", 0.5, 0.2)])
@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_pgd_stays_in_the_eps_ball_and_in_the_unit_box(model, data, norm, eps, step, loss):
    x, y = data
    x_adv = pgd(model, x, y, eps, step, 6, norm=norm, restarts=2, loss=loss,
                generator=torch.Generator().manual_seed(5))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(size.max()) > 0.5 * eps  # it did move


def test_pgd_succeeds_more_than_fgsm_and_more_with_more_steps(model, data):
    x, y = data
    eps = 8 / 255
    rates = [success_rate(model, x, x_adv, y) for x_adv in
             pgd_checkpoints(model, x, y, eps, 1 / 255, [1, 5, 20], generator=torch.Generator().manual_seed(1))]
    assert rates[0] < rates[1] <= rates[2] + 0.02
    assert rates[2] >= success_rate(model, x, fgsm(model, x, y, eps), y) - 0.02


def test_checkpoints_equal_separate_runs_with_the_same_seed(model, data):
    x, y = data[0][:50], data[1][:50]
    together = pgd_checkpoints(model, x, y, 0.1, 0.02, [3, 7], "l2", 2, generator=torch.Generator().manual_seed(3))
    for steps, x_adv in zip([3, 7], together):
        alone = pgd(model, x, y, 0.1, 0.02, steps, "l2", 2, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(alone, x_adv)


def test_more_restarts_never_lose_a_success(model, data):
    x, y = data
    one = pgd(model, x, y, 6 / 255, 2 / 255, 3, generator=torch.Generator().manual_seed(2))
    three = pgd(model, x, y, 6 / 255, 2 / 255, 3, restarts=3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fooled_one, fooled_three = model(one).argmax(1) != y, model(three).argmax(1) != y
    assert bool((fooled_three | ~fooled_one).all())  # every success of restart 1 is kept
    assert int(fooled_three.sum()) > int(fooled_one.sum())


def test_tpgd_raises_the_kl_divergence(model, data):
    x = data[0][:100]
    x_adv = tpgd(model, x, 8 / 255, 2 / 255, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p_clean = torch.softmax(model(x), 1)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), p_clean, reduction="none").sum(1)
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert float(kl.mean()) > 0.05


# --- LinBP ------------------------------------------------------------------------------------------


def linbp_reference_gradient(model: nn.Sequential, x, y, first: int) -> torch.Tensor:
    """∇ₓ CE with ReLU number `first` on (1-based) as x + (relu(x) - x).detach(): value relu, slope 1."""
    h = x.clone().requires_grad_(True)
    out, relu_index = h, 0
    for layer in model:
        if isinstance(layer, nn.ReLU):
            relu_index += 1
            out = out + (torch.relu(out) - out).detach() if relu_index >= first else torch.relu(out)
        else:
            out = layer(out)
    (grad,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), h)
    return grad


@pytest.mark.parametrize("first", [1, 2])
def test_linbp_gradient_matches_reference_and_differs_from_bp(model, data, first):
    x, y = data[0][:40], data[1][:40]
    linbp = input_gradient(model, x, y, gradient="linbp", first=first)
    torch.testing.assert_close(linbp, linbp_reference_gradient(model, x, y, first))
    assert float((linbp - input_gradient(model, x, y)).abs().max()) > 1e-3


def test_linbp_refuses_a_model_without_relu(data):
    torch.manual_seed(0)
    tanh_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = data[0][:40], data[1][:40]
    with pytest.raises(ValueError, match="applies no ReLU"):
        input_gradient(tanh_net, x, y, "linbp")
    with pytest.raises(ValueError, match="applies no ReLU"):
        pgd(tanh_net, x, y, 0.1, 0.02, 5, gradient="linbp", generator=torch.Generator().manual_seed(0))


def test_linbp_finds_functional_relus(data):
    """F.relu and x.relu() in forward are ReLUs for LinBP as nn.ReLU is: the gradient changes."""

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(64, 16), nn.Linear(16, 3)

        def forward(self, x):
            return self.second(self.first(x.flatten(1)).relu())

    torch.manual_seed(0)
    net = Functional()
    x, y = data[0][:40], data[1][:40]
    reference = x.clone().requires_grad_(True)
    hidden = net.first(reference.flatten(1))
    logits = net.second(hidden + (hidden.relu() - hidden).detach())  # relu forward, identity backward
    (want,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), reference)
    torch.testing.assert_close(input_gradient(net, x, y, "linbp"), want)
    assert not torch.allclose(input_gradient(net, x, y, "bp"), want)


def test_linbp_pgd_stays_in_the_ball(model, data):
    x, y = data
    x_adv = pgd(model, x, y, 8 / 255, 1 / 255, 10, gradient="linbp", first=1, restarts=2,
                generator=torch.Generator().manual_seed(0))
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert success_rate(model, x, x_adv, y) > 0.1


# --- model state --------------------------------------------------------------------------------------


def dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def test_attacks_keep_mode_and_parameter_grads(data):
    x, y = data[0][:30], data[1][:30]
    net = dropout_model()
    for training in (True, False):
        net.train(training)
        grads = [torch.full_like(p, 0.5) for p in net.parameters()]
        for p, g in zip(net.parameters(), grads):
            p.grad = g.clone()
        fgsm(net, x, y, 0.1)
        pgd(net, x, y, 0.1, 0.02, 3, norm="l2")
        tpgd(net, x, 0.1, 0.02, 2)
        input_gradient(net, x, y)
        pgd(net, x, y, 0.1, 0.02, 2, gradient="linbp")
        assert all(m.training == training for m in net.modules())
        for p, g in zip(net.parameters(), grads):
            torch.testing.assert_close(p.grad, g)


@needs_art
def test_art_attacks_keep_mode_and_parameter_grads(data):
    x, y = data[0][:30], data[1][:30]
    net = dropout_model().train()
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    square(net, x, y, 0.1, queries=5)
    apgd(net, x, y, 0.1, steps=3)
    art_pgd(net, x, y, 0.1, 0.02, 3)
    assert all(m.training for m in net.modules())
    assert all(bool((p.grad == 1).all()) and p.requires_grad for p in net.parameters())


# --- the attack library ----------------------------------------------------------------------------------


@needs_art
@pytest.mark.parametrize("norm, eps, step", [("linf", 6 / 255, 1 / 255), ("l2", 0.3, 0.05)])
def test_in_house_pgd_matches_art_pgd(model, data, norm, eps, step):
    """Same model, data and settings (10 steps, one random start): success rates within 2 points;
    without a random start both run the same deterministic iteration."""
    x, y = data
    ours = pgd(model, x, y, eps, step, 10, norm=norm, generator=torch.Generator().manual_seed(0))
    theirs = art_pgd(model, x, y, eps, step, 10, norm=norm, seed=0)
    ours_rate, theirs_rate = success_rate(model, x, ours, y), success_rate(model, x, theirs, y)
    assert 0.1 < ours_rate < 0.95  # a regime where the comparison means something
    assert abs(ours_rate - theirs_rate) <= 0.02
    fixed_ours = pgd(model, x, y, eps, step, 10, norm=norm, random_start=False)
    fixed_theirs = art_pgd(model, x, y, eps, step, 10, norm=norm, random_start=False)
    assert abs(success_rate(model, x, fixed_ours, y) - success_rate(model, x, fixed_theirs, y)) <= 0.02


@needs_art
def test_square_and_apgd_find_adversarials_inside_the_ball(model, data):
    x, y = data[0][:100], data[1][:100]
    eps = 16 / 255
    for x_adv in (square(model, x, y, eps, queries=50), apgd(model, x, y, eps, steps=10)):
        assert float((x_adv - x).abs().max()) <= eps + 1e-5
        assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
        assert success_rate(model, x, x_adv, y) > 0.2
    # seeded: the same call gives the same images
    torch.testing.assert_close(square(model, x, y, eps, queries=20, seed=4), square(model, x, y, eps, queries=20, seed=4))


@needs_art
def test_autoattack_ensemble_keeps_every_success_of_its_first_stage(model, data):
    x, y = data[0][:60], data[1][:60]
    eps = 6 / 255
    ensemble = autoattack(model, x, y, eps, steps=10, restarts=1, queries=50)
    first_stage = apgd(model, x, y, eps, steps=10, restarts=1)
    assert float((ensemble - x).abs().max()) <= eps + 1e-5
    assert success_rate(model, x, ensemble, y) >= success_rate(model, x, first_stage, y)
    with torch.no_grad():  # points it could not break are returned unchanged
        unbroken = model(ensemble).argmax(1) == y
    torch.testing.assert_close(ensemble[unbroken], x[unbroken])


@needs_art
def test_apgd_with_linbp_gradients_runs_and_differs(model, data):
    x, y = data[0][:100], data[1][:100]
    bp = apgd(model, x, y, 4 / 255, steps=5, gradient="bp")
    linbp = apgd(model, x, y, 4 / 255, steps=5, gradient="linbp")
    assert float((linbp - x).abs().max()) <= 4 / 255 + 1e-5
    assert not torch.equal(bp, linbp)


def test_missing_attack_library_says_how_to_install(monkeypatch, data):
    monkeypatch.setitem(sys.modules, "art", None)  # makes `import art` fail
    monkeypatch.setitem(sys.modules, "art.estimators.classification", None)
    x, y = data[0][:4], data[1][:4]
    with pytest.raises(MissingDependency, match=r"install robustbp\[attacks\]"):
        square(relu_mlp(), x, y, 0.1)
    with pytest.raises(ImportError):
        apgd(relu_mlp(), x, y, 0.1)
    assert not art_available()


# --- bad inputs --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_one_clear_value_error(model, data):
    x, y = data[0][:4], data[1][:4]
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        pgd(model, x, y, -0.1, 0.01, 3)
    with pytest.raises(ValueError, match="eps"):
        fgsm(model, x, y, -1.0)
    shifted = x.clone()
    shifted[0, 0, 0, 0], shifted[1, 0, 0, 0] = -0.5, 1.25
    with pytest.raises(ValueError, match=r"in \[0, 1\]; the values seen range over \[-0.5, 1.25\]"):
        fgsm(model, shifted, y, 0.1)
    with pytest.raises(ValueError, match="range over"):
        pgd(model, x + 2, y, 0.1, 0.01, 3)
    with pytest.raises(ValueError, match="unknown norm 'l1'"):
        pgd(model, x, y, 0.1, 0.01, 3, norm="l1")
    with pytest.raises(ValueError, match="unknown gradient"):
        input_gradient(model, x, y, gradient="sgd")
    with pytest.raises(ValueError, match="first must be an integer >= 1"):
        fgsm(model, x, y, 0.1, gradient="linbp", first=0)
    with pytest.raises(ValueError, match="unknown loss"):
        pgd(model, x, y, 0.1, 0.01, 3, loss="hinge")
    with pytest.raises(ValueError, match=r"y must have shape \(4,\)"):
        fgsm(model, x, y[:3], 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        fgsm(model, torch.full_like(x, float("nan")), y, 0.1)
    with pytest.raises(ValueError, match="restarts"):
        pgd(model, x, y, 0.1, 0.01, 3, restarts=0)
