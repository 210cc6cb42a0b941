"""The apgd suite: Auto-PGD (ART) success rate with BP against LinBP gradients, per ε (LinBP paper Table II)."""
from __future__ import annotations

from robustbp.attacks.art_adapter import apgd
from robustbp.evaluate import checks
from robustbp.evaluate.metrics import attack_success_rate
from robustbp.evaluate.report import format_table, new_figure, percent
from robustbp.evaluate.suites.base import (
    Evaluation,
    Setting,
    Suite,
    bp_and_linbp_entry,
    bp_linbp_lines,
    eps_label,
    needs_art,
    same_eps,
)

SETTINGS = {  # LinBP paper Table II: Auto-PGD, best of 5 restarts; LinBP from the linbp suite's linbp_first
    "apgd_eps": Setting(full=(8 / 255, 16 / 255)),
    "apgd_steps": Setting(full=100, quick=10),
    "apgd_restarts": Setting(full=5, quick=1),
}


def run(evaluation: Evaluation) -> dict:
    s, x, y = evaluation.settings, evaluation.x, evaluation.y
    eps_values = list(s.apgd_eps)
    models, warnings = {}, []
    for name, model in evaluation.models.items():
        entry, gradients = bp_and_linbp_entry(evaluation, name, warnings)
        for gradient in gradients:
            rates = []
            for eps in eps_values:
                x_adv = apgd(model, x, y, eps, s.apgd_steps, "linf", s.apgd_restarts, "ce", gradient, s.linbp_first,
                             seed=evaluation.seed)
                rates.append(attack_success_rate(model, x, x_adv, y))
            entry[gradient] = {"attack_success_rate": rates}
            label = "APGD-BP" if gradient == "bp" else f"APGD-LinBP(first={s.linbp_first})"
            warnings += checks.budget_warnings(name, label, "eps", eps_values, rates, evaluation.n, check_flat=False)
        models[name] = entry
    settings = {"eps": eps_values, "steps": s.apgd_steps, "restarts": s.apgd_restarts, "first": s.linbp_first,
                "norm": "linf", "loss": "ce"}
    return {"settings": settings, "models": models, "warnings": warnings}


def tables(result: dict) -> list[str]:
    st = result["settings"]
    rows = [[name, eps_label(eps), st["steps"], percent(m["bp"]["attack_success_rate"][i]),
             percent(m["linbp"]["attack_success_rate"][i]) if "linbp" in m else "no ReLU"]
            for name, m in result["models"].items()
            for i, eps in enumerate(st["eps"])]
    title = f"apgd: Auto-PGD (ART) success rate, best of {st['restarts']} restarts, LinBP from ReLU {st['first']}"
    return [format_table(title, ["model", "eps", "steps", "BP %", "LinBP %"], rows)]


def plot(result: dict):
    st = result["settings"]
    figure, (axis,) = new_figure()
    bp_linbp_lines(axis, st["eps"], lambda m, gradient: m[gradient]["attack_success_rate"], result["models"])
    axis.set(xlabel="eps", ylabel="attack success %", title=f"Auto-PGD, {st['steps']} steps")
    axis.legend()
    return figure


def linf_success_rates(result: dict, name: str, eps: float) -> dict[str, float]:
    m = result["models"][name]
    return {f"APGD-{'BP' if gradient == 'bp' else 'LinBP'}": m[gradient]["attack_success_rate"][i]
            for i, e in enumerate(result["settings"]["eps"]) if same_eps(e, eps)
            for gradient in ("bp", "linbp") if gradient in m}


SUITE = Suite("apgd", "Auto-PGD (ART, optional extra) success rate with BP against LinBP gradients, per eps",
              SETTINGS, run, tables, plot, check_images=needs_art, linf_success_rates=linf_success_rates)
