"""The pgd suite: PGD L∞, PGD L2 and TPGD by number of steps (spectral paper §4.2.2, Fig. 3)."""
from __future__ import annotations

from robustbp.evaluate import checks
from robustbp.evaluate.metrics import accuracy
from robustbp.evaluate.report import format_table, new_figure, percent
from robustbp.evaluate.suites.base import Evaluation, Setting, Suite, adversarial_rows, batched_pgd, same_eps

SETTINGS = {  # spectral paper §4.2.2: δ = 32/255, η = 2/255, strength by the number of iterations
    "pgd_eps_linf": Setting(full=32 / 255),
    "pgd_step_linf": Setting(full=2 / 255),
    "pgd_eps_l2": Setting(full=1.0),
    "pgd_step_l2": Setting(full=0.1),
    "pgd_steps": Setting(full=(1, 2, 5, 10, 20), quick=(1, 5)),
    "pgd_restarts": Setting(full=1),
}


def attacks(s) -> list[dict]:
    """The three attacks with their norm, loss and budget, from the settings `s`."""
    return [
        {"attack": "pgd_linf", "norm": "linf", "loss": "ce", "eps": s.pgd_eps_linf, "step": s.pgd_step_linf},
        {"attack": "pgd_l2", "norm": "l2", "loss": "ce", "eps": s.pgd_eps_l2, "step": s.pgd_step_l2},
        {"attack": "tpgd", "norm": "linf", "loss": "kl", "eps": s.pgd_eps_linf, "step": s.pgd_step_linf},
    ]


def run(evaluation: Evaluation) -> dict:
    s = evaluation.settings
    steps = list(s.pgd_steps)
    models, warnings = {}, []
    for name, model in evaluation.models.items():
        health, health_warnings = evaluation.gradient_health(name)
        warnings += health_warnings
        clean = accuracy(model, evaluation.x, evaluation.y)
        entry = {"clean_accuracy": clean, "gradient_health": health}
        for attack in attacks(s):
            adversarial = batched_pgd(model, evaluation, attack["eps"], attack["step"], steps, attack["norm"],
                                      s.pgd_restarts, attack["loss"], "bp", 1)
            entry[attack["attack"]] = {"steps": steps,
                                       **adversarial_rows(model, evaluation.x, adversarial, evaluation.y, clean)}
            warnings += checks.budget_warnings(name, attack["attack"].upper(), "steps", steps,
                                               entry[attack["attack"]]["attack_success_rate"], evaluation.n)
        models[name] = entry
    settings = {"attacks": attacks(s), "steps": steps, "restarts": s.pgd_restarts, "random_start": True}
    return {"settings": settings, "models": models, "warnings": warnings}


def tables(result: dict) -> list[str]:
    rows = [[name, a["attack"], f"{a['eps']:.4g}", f"{a['step']:.4g}", k, percent(acc), percent(d), percent(r)]
            for name, m in result["models"].items()
            for a in result["settings"]["attacks"]
            for k, acc, d, r in zip(m[a["attack"]]["steps"], m[a["attack"]]["accuracy"], m[a["attack"]]["drop"],
                                    m[a["attack"]]["attack_success_rate"])]
    return [format_table("pgd: PGD Linf, PGD L2, TPGD (random start)",
                         ["model", "attack", "eps", "step", "steps", "accuracy %", "drop (points)", "success %"], rows)]


def plot(result: dict):
    attack_settings = result["settings"]["attacks"]
    figure, axes = new_figure(len(attack_settings))
    for axis, a in zip(axes, attack_settings):
        for name, m in result["models"].items():
            curve = m[a["attack"]]
            axis.plot(curve["steps"], [100 * d for d in curve["drop"]], marker="o", label=name)
        axis.set(xlabel="steps", ylabel="accuracy drop (points)", title=f"{a['attack']} eps={a['eps']:.3g}")
        axis.legend()
    return figure


def linf_success_rates(result: dict, name: str, eps: float) -> dict[str, float]:
    """Each L∞ attack at its largest number of steps."""
    return {a["attack"].upper(): result["models"][name][a["attack"]]["attack_success_rate"][-1]
            for a in result["settings"]["attacks"] if a["norm"] == "linf" and same_eps(a["eps"], eps)}


SUITE = Suite("pgd", "PGD Linf, PGD L2 and TPGD (random start) by number of steps", SETTINGS, run, tables, plot,
              linf_success_rates=linf_success_rates)
