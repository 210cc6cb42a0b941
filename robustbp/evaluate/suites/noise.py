"""The noise suite: error under clip(x + N(0, σ²)) per σ, drop from clean accuracy (spectral Fig. 3, IBP Fig. 4)."""
from __future__ import annotations

from robustbp.evaluate.metrics import noise_curve
from robustbp.evaluate.report import format_table, new_figure, percent
from robustbp.evaluate.suites.base import Evaluation, Setting, Suite

SETTINGS = {"noise_sigmas": Setting(full=(0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5), quick=(0.0, 0.1, 0.3))}


def run(evaluation: Evaluation) -> dict:
    sigmas = list(evaluation.settings.noise_sigmas)
    models = {name: noise_curve(model, evaluation.x, evaluation.y, sigmas, evaluation.seed)
              for name, model in evaluation.models.items()}
    return {"settings": {"sigma": sigmas, "seed": evaluation.seed}, "models": models, "warnings": []}


def tables(result: dict) -> list[str]:
    rows = [[name, f"{sigma:g}", percent(a), percent(e), percent(d)]
            for name, m in result["models"].items()
            for sigma, a, e, d in zip(m["sigma"], m["accuracy"], m["error"], m["drop"])]
    return [format_table("noise: x + N(0, sigma^2), clipped to [0, 1]",
                         ["model", "sigma", "accuracy %", "error %", "drop (points)"], rows)]


def plot(result: dict):
    figure, (axis,) = new_figure()
    for name, m in result["models"].items():
        axis.plot(m["sigma"], [100 * d for d in m["drop"]], marker="o", label=name)
    axis.set(xlabel="noise sigma", ylabel="accuracy drop (points)", title="Gaussian noise")
    axis.legend()
    return figure


SUITE = Suite("noise", "error under Gaussian noise clip(x + N(0, sigma^2)) per sigma", SETTINGS, run, tables, plot)
