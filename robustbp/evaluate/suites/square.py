"""The square suite: the gradient-free Square attack (ART) by number of queries (spectral paper Fig. 3)."""
from __future__ import annotations

import torch

from robustbp.attacks.art_adapter import square
from robustbp.evaluate import checks
from robustbp.evaluate.metrics import accuracy
from robustbp.evaluate.report import format_table, new_figure, percent
from robustbp.evaluate.suites.base import Evaluation, Setting, Suite, adversarial_rows, eps_label, needs_art

SETTINGS = {
    "square_eps": Setting(full=32 / 255),
    "square_queries": Setting(full=(10, 100, 1000), quick=(20, 100)),
    "square_p_init": Setting(full=0.8),
}


def check_images(images: torch.Tensor) -> None:
    if images.dim() != 4:
        raise ValueError(f"the square suite needs images of shape (N, C, H, W), got {tuple(images.shape)}")
    needs_art(images)


def run(evaluation: Evaluation) -> dict:
    s, x, y = evaluation.settings, evaluation.x, evaluation.y
    queries = list(s.square_queries)
    models, warnings = {}, []
    for name, model in evaluation.models.items():
        clean = accuracy(model, x, y)
        adversarial = [square(model, x, y, s.square_eps, q, "linf", s.square_p_init, seed=evaluation.seed)
                       for q in queries]
        models[name] = {"queries": queries, "clean_accuracy": clean,
                        **adversarial_rows(model, x, adversarial, y, clean)}
        # a random search needs orders of magnitude more queries to show a rise (quick mode: 20 → 100)
        warnings += checks.budget_warnings(name, "Square", "queries", queries, models[name]["attack_success_rate"],
                                           evaluation.n, check_flat=max(queries) >= 100 * min(queries))
    settings = {"eps": s.square_eps, "norm": "linf", "queries": queries, "p_init": s.square_p_init}
    return {"settings": settings, "models": models, "warnings": warnings}


def tables(result: dict) -> list[str]:
    eps = eps_label(result["settings"]["eps"])
    rows = [[name, eps, q, percent(a), percent(d), percent(r)]
            for name, m in result["models"].items()
            for q, a, d, r in zip(m["queries"], m["accuracy"], m["drop"], m["attack_success_rate"])]
    return [format_table("square: gradient-free Square attack (ART), Linf",
                         ["model", "eps", "queries", "accuracy %", "drop (points)", "success %"], rows)]


def plot(result: dict):
    figure, (axis,) = new_figure()
    for name, m in result["models"].items():
        axis.plot(m["queries"], [100 * d for d in m["drop"]], marker="o", label=name)
    axis.set(xlabel="queries", ylabel="accuracy drop (points)", xscale="log",
             title=f"Square eps={eps_label(result['settings']['eps'])}")
    axis.legend()
    return figure


def compare(result: dict, others: list[tuple[Suite, dict]], evaluation: Evaluation) -> list[str]:
    """Check 2: Square at its largest query budget against every gradient attack at the same L∞ ε."""
    eps = result["settings"]["eps"]
    warnings = []
    for name in evaluation.models:
        rates = {}
        for suite, other in others:
            if suite.linf_success_rates is not None:
                rates.update(suite.linf_success_rates(other, name, eps))
        square_rate = result["models"][name]["attack_success_rate"][-1]
        warnings += checks.square_warnings(name, eps, "Linf", square_rate, rates, evaluation.n)
    return warnings


SUITE = Suite("square", "gradient-free Square attack (ART, optional extra) by number of queries", SETTINGS, run,
              tables, plot, check_images=check_images, compare=compare)
