"""Robustness evaluation: the registered suites (clean, noise, attacks, boundary, spectral) and their measures.

The CLI calls `evaluate_runs(models, images, labels, suites, out_dir, seed, quick)` with suite
names from `SUITES` (the names in `suites.REGISTRY`); the pieces it is built from are public too.
"""
from robustbp.evaluate.boundary import boundary_distance
from robustbp.evaluate.checks import budget_warnings, gradient_warnings, square_warnings
from robustbp.evaluate.metrics import (
    accuracy,
    attack_success_rate,
    gaussian_noise,
    gradient_noise_curve,
    noise_curve,
    predict,
)
from robustbp.evaluate.spectral import (
    jacobian_spectral_norm,
    layer_spectral_norms,
    spectral_error_curve,
    spectral_norm_bound,
    spectral_timing,
)
from robustbp.evaluate.suites import REGISTRY, SUITES, Setting, Suite
from robustbp.evaluate.settings import FULL, QUICK, SuiteSettings, override_settings
from robustbp.evaluate.runner import evaluate_runs

__all__ = [
    "FULL",
    "QUICK",
    "REGISTRY",
    "SUITES",
    "Setting",
    "Suite",
    "SuiteSettings",
    "override_settings",
    "accuracy",
    "attack_success_rate",
    "boundary_distance",
    "budget_warnings",
    "evaluate_runs",
    "gaussian_noise",
    "gradient_noise_curve",
    "gradient_warnings",
    "jacobian_spectral_norm",
    "layer_spectral_norms",
    "noise_curve",
    "predict",
    "spectral_error_curve",
    "spectral_norm_bound",
    "spectral_timing",
    "square_warnings",
]
