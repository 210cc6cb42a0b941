"""Evaluation: closed forms on linear models, noise curves, warnings, evaluate_runs files and errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from robustbp.attacks import art_available
from robustbp.evaluate import (
    FULL,
    QUICK,
    REGISTRY,
    SUITES,
    accuracy,
    attack_success_rate,
    boundary_distance,
    budget_warnings,
    evaluate_runs,
    gaussian_noise,
    gradient_noise_curve,
    gradient_warnings,
    jacobian_spectral_norm,
    layer_spectral_norms,
    noise_curve,
    override_settings,
    spectral_error_curve,
    spectral_norm_bound,
    square_warnings,
)
from robustbp.io import write_atomic
from robustbp.layers import Normalize
from robustbp.validation import MissingDependency

from .helpers import one_thread, synthetic_data, trained  # noqa: F401 (one_thread: autouse fixture)

needs_art = pytest.mark.skipif(
    not art_available(), reason="ART (adversarial-robustness-toolbox) is not importable; install robustbp[attacks]"
)


class Quantize(nn.Module):
    """round(x·levels)/levels: a forward that masks input gradients (torch.round has derivative 0)."""

    def __init__(self, levels: int = 4):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * self.levels) / self.levels


def mlp(seed: int, masked: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3)]
    return nn.Sequential(Quantize(), *layers) if masked else nn.Sequential(*layers)


@pytest.fixture(scope="module")
def data():
    return synthetic_data(120)


@pytest.fixture(scope="module")
def models(data):
    torch.set_num_threads(1)
    torch.manual_seed(1)
    tanh = nn.Sequential(Normalize(0.5, 0.25), nn.Flatten(), nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 3))
    return {"relu": trained(mlp(0), *data), "tanh": trained(tanh, *data)}


# --- boundary distance: closed forms for linear classifiers ------------------------------------------


def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def closed_form_distance(weight, bias, x) -> torch.Tensor:
    """min over j ≠ y of |(w_y - w_j)·x + b_y - b_j| / ‖w_y - w_j‖, y = argmax (Wx + b)."""
    y = (x @ weight.T + bias).argmax(dim=1)
    distances = []
    for i in range(x.shape[0]):
        k = y[i]
        others = [j for j in range(weight.shape[0]) if j != k]
        w_diff = weight[k] - weight[others]
        b_diff = bias[k] - bias[others]
        distances.append(((w_diff @ x[i] + b_diff).abs() / w_diff.norm(dim=1)).min())
    return torch.stack(distances)


@pytest.mark.parametrize("dims, classes", [(2, 2), (3, 4)])
def test_boundary_distance_of_a_linear_classifier_matches_the_closed_form(dims, classes):
    """Sampled spheres + binary search over-estimate the distance only by the angle between the best
    of 4000 sampled directions and the boundary's normal: within 1 % in 2 and 3 dimensions."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(classes, dims, generator=generator, dtype=torch.float64)
    bias = 0.3 * torch.randn(classes, generator=generator, dtype=torch.float64)
    x = torch.rand(25, dims, generator=generator, dtype=torch.float64)
    expected = closed_form_distance(weight, bias, x)
    found = boundary_distance(linear_model(weight, bias), x, n_samples=4000, initial_radius=0.05, rel_tol=1e-5,
                              generator=torch.Generator().manual_seed(1))
    assert found.shape == (25,)
    assert bool((found >= expected * (1 - 1e-9)).all())  # never below the true distance
    torch.testing.assert_close(found, expected, rtol=1e-2, atol=0)


def test_boundary_distance_is_inf_when_the_class_never_changes():
    constant = linear_model(torch.zeros(2, 2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64))
    found = boundary_distance(constant, torch.full((3, 2), 0.5, dtype=torch.float64), n_samples=10, max_radius=4.0)
    assert bool(torch.isinf(found).all())


# --- spectral norm --------------------------------------------------------------------------------------


def test_jacobian_spectral_norm_of_a_linear_classifier_is_the_weight_norm():
    torch.manual_seed(0)
    weight = torch.randn(5, 12, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), linear_model(weight, torch.randn(5, dtype=torch.float64)))
    x = torch.rand(7, 3, 4, dtype=torch.float64)
    sigma = float(np.linalg.norm(weight.numpy(), 2))
    torch.testing.assert_close(jacobian_spectral_norm(model, x), torch.full((7,), sigma, dtype=torch.float64))
    assert spectral_norm_bound(model) == pytest.approx(sigma, rel=1e-12)


def test_jacobian_spectral_norm_matches_autograd_jacobian(models, data):
    model, x = models["relu"], data[0][:5]
    for i in range(5):
        jacobian = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).squeeze(0), x[i])
        expected = np.linalg.norm(jacobian.reshape(3, -1).numpy(), 2)
        assert float(jacobian_spectral_norm(model, x[i : i + 1])[0]) == pytest.approx(expected, rel=1e-5)


def test_bound_is_the_product_of_layer_norms_and_covers_normalize_and_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3)
    model = nn.Sequential(Normalize(0.5, 0.25), conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    norms = dict(layer_spectral_norms(model))
    assert norms["0"] == pytest.approx(4.0)  # 1 / std
    assert norms["1"] == pytest.approx(float(np.linalg.norm(conv.weight.detach().reshape(4, -1).numpy(), 2)), rel=1e-5)
    assert spectral_norm_bound(model) == pytest.approx(math.prod(norms.values()), rel=1e-9)


def test_spectral_error_curve_is_exact_for_linear_and_bounded_for_relu(models, data):
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    curve = spectral_error_curve(linear, data[0][:8], [1, 30])
    assert curve["estimate_rel_error_max"][-1] < 1e-3  # power iteration converges on a fixed matrix
    assert curve["bound_rel_error_mean"] < 1e-5  # one layer: the bound is the norm
    relu = spectral_error_curve(models["relu"], data[0][:16], [1, 5, 50])
    assert relu["estimate_rel_error_mean"][-1] < relu["estimate_rel_error_mean"][0]
    assert relu["estimate_rel_error_mean"][-1] < 1e-2
    assert relu["bound"] >= relu["exact_mean"]  # ∏‖W_l‖ bounds a Linear/ReLU network's Jacobian norm


# --- accuracy, noise, one-step curves ------------------------------------------------------------------


def correct_count(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """How many points a model in eval mode classifies right, counted with plain torch."""
    with torch.no_grad():
        return int((model(x).argmax(dim=1) == y).sum())


def test_accuracy_is_the_fraction_of_correct_points_in_eval_mode(models, data):
    x, y = data
    model = nn.Sequential(nn.Dropout(0.9), models["relu"]).train()
    expected = correct_count(models["relu"], x, y) / len(y)
    assert accuracy(model, x, y) == expected  # dropout off: eval mode inside
    assert accuracy(model, x, y, batch_size=7) == expected
    assert model.training and model[1].training  # every flag put back
    wrong_labels = (y + 1) % 3
    others = accuracy(models["relu"], x, wrong_labels) + accuracy(models["relu"], x, (y + 2) % 3)
    assert others == pytest.approx(1 - expected, abs=1e-12)


def test_noise_curve_at_sigma_zero_is_clean_accuracy_and_is_seeded(models, data):
    x, y = data
    model = models["relu"]
    clean = correct_count(model, x, y) / len(y)
    curve = noise_curve(model, x, y, [0.0, 0.1, 0.5], seed=3)
    assert curve["accuracy"][0] == clean and curve["drop"][0] == 0.0 and curve["error"][0] == 1 - clean
    assert curve["clean_accuracy"] == clean
    assert curve == noise_curve(model, x, y, [0.0, 0.1, 0.5], seed=3)
    assert curve["accuracy"][2] < clean  # heavy noise hurts
    noisy = gaussian_noise(x, 0.5, torch.Generator().manual_seed(0))
    assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1


def test_gradient_noise_curve_at_eps_zero_is_clean(models, data):
    x, y = data
    curve = gradient_noise_curve(models["relu"], x, y, [0.0, 0.05], "sign")
    assert curve["drop"][0] == 0.0 and curve["attack_success_rate"][0] == 0.0
    assert curve["attack_success_rate"][1] > 0


def test_attack_success_rate_counts_only_correct_points():
    """logits (x, 0.75 - x): class 0 when x > 0.375. Three points are correct; one of them is fooled;
    the fourth is wrong from the start and does not count."""
    model = nn.Sequential(nn.Flatten(), linear_model(torch.tensor([[1.0], [-1.0]], dtype=torch.float64),
                                                     torch.tensor([0.0, 0.75], dtype=torch.float64)))
    x = torch.tensor([[0.9], [0.8], [0.7], [0.6]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1])
    x_adv = torch.tensor([[0.9], [0.1], [0.5], [0.6]], dtype=torch.float64)
    assert attack_success_rate(model, x, x_adv, y) == pytest.approx(1 / 3)
    assert math.isnan(attack_success_rate(model, x[3:], x_adv[3:], y[3:]))  # no correct point


# --- warnings -------------------------------------------------------------------------------------------


def test_budget_warnings_fire_on_flat_or_falling_curves_only():
    assert budget_warnings("m", "PGD", "steps", [1, 5, 20], [0.2, 0.5, 0.9], 500) == []
    assert budget_warnings("m", "PGD", "steps", [1, 5, 20], [1.0, 1.0, 1.0], 500) == []  # saturated
    flat = budget_warnings("m", "PGD", "steps", [1, 5, 20], [0.3, 0.31, 0.3], 500)
    assert len(flat) == 1 and "does not rise" in flat[0]
    falling = budget_warnings("m", "PGD", "steps", [1, 5, 20], [0.3, 0.8, 0.5], 500)
    assert len(falling) == 1 and "falls from 80.0% at steps 5 to 50.0% at steps 20" in falling[0]
    assert budget_warnings("m", "PGD", "steps", [10, 100], [0.01, 0.01], 500, check_flat=False) == []
    assert budget_warnings("m", "PGD", "steps", [10, 100], [0.3, 0.1], 500, check_flat=False)
    assert square_warnings("m", 0.1, "Linf", 0.6, {"PGD": 0.3}, 500)
    assert square_warnings("m", 0.1, "Linf", 0.6, {"PGD": 0.59}, 500) == []
    assert gradient_warnings("m", {"zero_share": 0.5, "nonfinite_share": 0.0})
    assert gradient_warnings("m", {"zero_share": 0.0, "nonfinite_share": 0.0}) == []


@needs_art
def test_warnings_fire_on_a_gradient_masking_model_and_not_on_a_normal_one(data, tmp_path, capsys):
    x, y = synthetic_data(200, seed=5)
    normal = trained(mlp(0), x, y)
    masked = trained(mlp(0, masked=True), x, y)
    suites = ["fgsm", "pgd", "square"]
    clean_run = evaluate_runs({"normal": normal}, x, y, suites, tmp_path / "normal", quick=True)
    assert clean_run["warnings"] == []
    masked_run = evaluate_runs({"masked": masked}, x, y, suites, tmp_path / "masked", quick=True)
    text = "\n".join(masked_run["warnings"])
    assert "input gradient is exactly zero on 100.0% of the points" in text
    assert "does not rise" in text
    assert "Square attack" in text and "beats the best gradient attack" in text
    assert "WARNING (possible false robustness)" in capsys.readouterr().out
    stored = json.loads((tmp_path / "masked" / "square.json").read_text())
    assert any("beats" in w for w in stored["warnings"])


# --- evaluate_runs ----------------------------------------------------------------------------------------


class RecordsMode(nn.Module):
    """Identity that remembers whether it ran in training mode."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


@needs_art
def test_evaluate_runs_writes_every_suite_and_restores_modes(models, data, tmp_path, capsys):
    x, y = data[0][:48], data[1][:48]
    recorder = RecordsMode()
    relu = nn.Sequential(recorder, models["relu"]).train()
    out = tmp_path / "eval"
    result = evaluate_runs({"relu": relu, "tanh": models["tanh"]}, x, y, list(SUITES), out, seed=0, quick=True)
    printed = capsys.readouterr().out
    assert set(result["suites"]) == set(SUITES)
    for suite in SUITES:
        stored = json.loads((out / f"{suite}.json").read_text())
        assert stored["suite"] == suite and set(stored["models"]) == {"relu", "tanh"}
        assert (out / f"{suite}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert suite in printed
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert all(m.training for m in relu.modules()) and not models["tanh"].training  # modes restored
    assert recorder.seen and not any(recorder.seen)  # evaluated in eval mode
    suites = result["suites"]
    clean = suites["clean"]["models"]["relu"]["accuracy"]
    assert suites["noise"]["models"]["relu"]["accuracy"][0] == clean
    tanh = suites["linbp"]["models"]["tanh"]  # no ReLU: LinBP would be BP, so only BP is reported
    assert not tanh["has_relu"] and "linbp" not in tanh and "bp" in tanh
    assert any("tanh: the model applies no ReLU" in w for w in suites["linbp"]["warnings"])
    boundary = suites["boundary"]["models"]
    assert boundary["relu"]["n"] == boundary["tanh"]["n"] > 0  # the same points for both models
    assert boundary["relu"]["q1"] <= boundary["relu"]["median"] <= boundary["relu"]["q3"]
    spectral = suites["spectral"]["models"]["relu"]
    assert spectral["error"]["bound"] >= spectral["error"]["exact_mean"]


# --- every registered suite, alone, in quick mode: its files, its table and its numbers --------------------


def is_count_of(fraction: float, n: int) -> bool:
    """fraction is k/n for a whole k."""
    return fraction * n == pytest.approx(round(fraction * n), abs=1e-9)


def fgsm_sign_step(model, x, y, eps):
    """clip(x + eps·sign(∇ₓ CE), 0, 1) with plain autograd, the CE summed over the points."""
    x = x.clone().requires_grad_(True)
    gradient, = torch.autograd.grad(nn.functional.cross_entropy(model(x), y, reduction="sum"), x)
    return (x + eps * gradient.sign()).clamp(0, 1).detach()


def check_clean(result, models, x, y, settings):
    for name, model in models.items():
        count = correct_count(model, x, y)
        numbers = result["models"][name]
        assert numbers["accuracy"] == count / len(y) and numbers["n_correct"] == count and numbers["n"] == len(y)
        assert numbers["error"] == pytest.approx(1 - count / len(y), abs=1e-12)


def check_noise(result, models, x, y, settings):
    for name, model in models.items():
        curve = result["models"][name]
        assert curve["sigma"] == list(settings.noise_sigmas)
        for sigma, fraction in zip(curve["sigma"], curve["accuracy"]):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(result["seed"]))
            noisy = (x + sigma * noise).clamp(0, 1)
            assert fraction == correct_count(model, noisy, y) / len(y)


def check_fgsm(result, models, x, y, settings):
    for name, model in models.items():
        curve = result["models"][name]["sign"]
        assert curve["clean_accuracy"] == correct_count(model, x, y) / len(y)
        for eps, fraction in zip(curve["eps"], curve["accuracy"]):
            assert fraction == correct_count(model, fgsm_sign_step(model, x, y, eps), y) / len(y)
        assert curve["attack_success_rate"][0] == 0.0  # eps = 0 moves nothing


def check_pgd(result, models, x, y, settings):
    for name, model in models.items():
        numbers = result["models"][name]
        clean = correct_count(model, x, y) / len(y)
        assert numbers["clean_accuracy"] == clean
        for attack in ("pgd_linf", "pgd_l2", "tpgd"):
            curve = numbers[attack]
            assert curve["steps"] == list(settings.pgd_steps)
            assert all(is_count_of(a, len(y)) for a in curve["accuracy"])
            assert curve["drop"] == [clean - a for a in curve["accuracy"]]


def check_success_rates(rates, model, x, y):
    """Every success rate is a count of the model's correctly classified points."""
    count = correct_count(model, x, y)
    flat = [r for row in rates for r in (row if isinstance(row, list) else [row])]
    assert flat and all(0 <= r <= 1 and is_count_of(r, count) for r in flat)


def check_linbp(result, models, x, y, settings):
    for name, model in models.items():
        numbers = result["models"][name]
        assert len(numbers["bp"]["attack_success_rate"]) == len(settings.linbp_eps)
        for gradient in ("bp", "linbp") if numbers["has_relu"] else ("bp",):
            check_success_rates(numbers[gradient]["attack_success_rate"], model, x, y)
    assert result["models"]["relu"]["has_relu"] and not result["models"]["tanh"]["has_relu"]


def check_square(result, models, x, y, settings):
    for name, model in models.items():
        numbers = result["models"][name]
        assert numbers["clean_accuracy"] == correct_count(model, x, y) / len(y)
        assert numbers["queries"] == list(settings.square_queries)
        assert all(is_count_of(a, len(y)) for a in numbers["accuracy"])
        check_success_rates(numbers["attack_success_rate"], model, x, y)


def check_apgd(result, models, x, y, settings):
    for name, model in models.items():
        numbers = result["models"][name]
        assert len(numbers["bp"]["attack_success_rate"]) == len(settings.apgd_eps)
        check_success_rates(numbers["bp"]["attack_success_rate"], model, x, y)


def check_boundary(result, models, x, y, settings):
    with torch.no_grad():
        right_by_all = torch.stack([model(x).argmax(1) == y for model in models.values()]).all(dim=0)
    expected = torch.nonzero(right_by_all).flatten()[: settings.boundary_points].tolist()
    assert result["settings"]["point_indices"] == expected and expected
    for numbers in result["models"].values():
        assert numbers["n"] == len(expected) == len(numbers["distances"])
        assert numbers["q1"] <= numbers["median"] <= numbers["q3"]


def check_spectral(result, models, x, y, settings):
    points = x[: settings.spectral_points]
    for name, model in models.items():
        norms = [np.linalg.norm(torch.autograd.functional.jacobian(lambda v: model(v[None])[0], p).reshape(3, -1), 2)
                 for p in points]
        error = result["models"][name]["error"]
        assert error["n"] == len(points) and error["exact_mean"] == pytest.approx(float(np.mean(norms)), rel=1e-4)
        assert error["bound"] >= error["exact_mean"]


NUMBER_CHECKS = {
    "clean": check_clean, "noise": check_noise, "fgsm": check_fgsm, "pgd": check_pgd, "linbp": check_linbp,
    "square": check_square, "apgd": check_apgd, "boundary": check_boundary, "spectral": check_spectral,
}


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_suite_runs_alone_and_its_numbers_are_counts(name, models, data, tmp_path, capsys):
    suite = REGISTRY[name]
    assert name in NUMBER_CHECKS, f"add a check of the {name} suite's numbers to NUMBER_CHECKS"
    x, y = data[0][:40], data[1][:40]
    try:
        suite.check_images(x)
    except MissingDependency as error:
        pytest.skip(str(error))
    settings = override_settings(QUICK, ["boundary_samples=64", "spectral_batch_sizes=1,2"])
    result = evaluate_runs(models, x, y, [name], tmp_path, seed=2, quick=True, settings=settings)
    stored = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(result["suites"]) == {name} and stored["suite"] == name and stored["n_points"] == 40
    assert set(stored["models"]) == set(models) and isinstance(stored["warnings"], list)
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert all(table in printed for table in suite.tables(stored))  # the table printed is the stored result's
    NUMBER_CHECKS[name](result["suites"][name], models, x, y, settings)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_setting_of_a_suite_is_in_the_settings_and_takes_set(name):
    for setting_name, setting in REGISTRY[name].settings.items():
        assert getattr(FULL, setting_name) == setting.full and getattr(QUICK, setting_name) == setting.value(True)
        value = setting.value(True)
        text = ",".join(map(repr, value)) if isinstance(value, tuple) else repr(value)
        assert getattr(override_settings(FULL, [f"{setting_name}={text}"]), setting_name) == value


def test_evaluate_runs_noise_only_needs_no_extras(models, data, tmp_path):
    x, y = data
    result = evaluate_runs({"relu": models["relu"]}, x, y, ["noise", "clean"], tmp_path, quick=True)
    assert list(result["suites"]) == ["clean", "noise"]  # run in SUITES order
    assert result["suites"]["noise"]["models"]["relu"]["drop"][0] == 0.0


def test_evaluate_runs_validates_before_writing(models, data, tmp_path):
    x, y = data
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="unknown suite 'pgd2'; choose from clean, noise"):
        evaluate_runs(models, x, y, ["noise", "pgd2"], out)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\]; the values seen range over \[0.*, 2"):
        evaluate_runs(models, x * 2, y, ["noise"], out)
    with pytest.raises(ValueError, match="labels must have shape"):
        evaluate_runs(models, x, y[:-1], ["noise"], out)
    with pytest.raises(ValueError, match="no suite"):
        evaluate_runs(models, x, y, [], out)
    with pytest.raises(ValueError, match="non-empty dict"):
        evaluate_runs({}, x, y, ["noise"], out)
    with pytest.raises(ValueError, match="labels go up to 5"):
        evaluate_runs(models, x, torch.full_like(y, 5), ["noise"], out)
    with pytest.raises(ValueError, match=r"model 'relu' cannot process images of shape \(1, 4, 4\)"):
        evaluate_runs(models, x[:, :, :4, :4], y, ["noise"], out)
    with pytest.raises(ValueError, match="settings must be a SuiteSettings"):
        evaluate_runs(models, x, y, ["noise"], out, settings={"noise_sigmas": (0.1,)})
    assert not out.exists()


def test_negative_budgets_are_rejected(models, data):
    x, y = data
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        noise_curve(models["relu"], x, y, [0.1, -0.2])
    with pytest.raises(ValueError, match="sigma"):
        gaussian_noise(x, -1.0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        gradient_noise_curve(models["relu"], x, y, [-0.1])
    with pytest.raises(ValueError, match="n_samples"):
        boundary_distance(models["relu"], x, n_samples=0)


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "suite.json"
    target.write_text("old")

    def failing_writer(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, failing_writer)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["suite.json"]
