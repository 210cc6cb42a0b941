"""The linbp suite: PGD L∞ success rate with BP against LinBP gradients, by ε and steps (LinBP paper Table I)."""
from __future__ import annotations

from robustbp.evaluate import checks
from robustbp.evaluate.metrics import attack_success_rate
from robustbp.evaluate.report import format_table, new_figure, percent
from robustbp.evaluate.suites.base import (
    Evaluation,
    Setting,
    Suite,
    batched_pgd,
    bp_and_linbp_entry,
    bp_linbp_lines,
    eps_label,
    same_eps,
)

SETTINGS = {  # LinBP paper Table I: step 1/255, best of 5 restarts
    "linbp_eps": Setting(full=(8 / 255, 16 / 255)),
    "linbp_step": Setting(full=1 / 255),
    "linbp_steps": Setting(full=(10, 20, 100), quick=(2, 5)),
    "linbp_restarts": Setting(full=5, quick=1),
    "linbp_first": Setting(full=1),  # LinBP from this ReLU on; the apgd suite uses it too
}


def run(evaluation: Evaluation) -> dict:
    s = evaluation.settings
    steps, eps_values = list(s.linbp_steps), list(s.linbp_eps)
    models, warnings = {}, []
    for name, model in evaluation.models.items():
        entry, gradients = bp_and_linbp_entry(evaluation, name, warnings)
        for gradient in gradients:
            label = "PGD-BP" if gradient == "bp" else f"PGD-LinBP(first={s.linbp_first})"
            table = []  # table[i][j]: success rate at eps_values[i], steps[j]
            for eps in eps_values:
                adversarial = batched_pgd(model, evaluation, eps, s.linbp_step, steps, "linf", s.linbp_restarts, "ce",
                                          gradient, s.linbp_first)
                table.append([attack_success_rate(model, evaluation.x, x_adv, evaluation.y) for x_adv in adversarial])
                warnings += checks.budget_warnings(name, f"{label} eps={eps_label(eps)}", "steps", steps, table[-1],
                                                   evaluation.n, check_flat=False)
            for j, k in enumerate(steps):
                warnings += checks.budget_warnings(name, f"{label} steps={k}", "eps", eps_values,
                                                   [row[j] for row in table], evaluation.n, check_flat=False)
            entry[gradient] = {"attack_success_rate": table}
        models[name] = entry
    settings = {"eps": eps_values, "step": s.linbp_step, "steps": steps, "restarts": s.linbp_restarts,
                "first": s.linbp_first, "norm": "linf", "random_start": True}
    return {"settings": settings, "models": models, "warnings": warnings}


def tables(result: dict) -> list[str]:
    st = result["settings"]
    rows = [[name, eps_label(eps), k, percent(m["bp"]["attack_success_rate"][i][j]),
             percent(m["linbp"]["attack_success_rate"][i][j]) if "linbp" in m else "no ReLU"]
            for name, m in result["models"].items()
            for i, eps in enumerate(st["eps"])
            for j, k in enumerate(st["steps"])]
    title = (f"linbp: PGD Linf success rate on correctly classified points, step {eps_label(st['step'])}, "
             f"best of {st['restarts']} restarts, LinBP from ReLU {st['first']}")
    return [format_table(title, ["model", "eps", "steps", "BP %", "LinBP %"], rows)]


def plot(result: dict):
    st = result["settings"]
    figure, axes = new_figure(len(st["eps"]))
    for i, (axis, eps) in enumerate(zip(axes, st["eps"])):
        bp_linbp_lines(axis, st["steps"], lambda m, gradient: m[gradient]["attack_success_rate"][i], result["models"])
        axis.set(xlabel="steps", ylabel="attack success %", title=f"PGD eps={eps_label(eps)}")
        axis.legend()
    return figure


def linf_success_rates(result: dict, name: str, eps: float) -> dict[str, float]:
    """BP and LinBP PGD at the largest number of steps."""
    m = result["models"][name]
    return {f"PGD-{'BP' if gradient == 'bp' else 'LinBP'}": m[gradient]["attack_success_rate"][i][-1]
            for i, e in enumerate(result["settings"]["eps"]) if same_eps(e, eps)
            for gradient in ("bp", "linbp") if gradient in m}


SUITE = Suite("linbp", "PGD Linf success rate with BP against LinBP gradients, by eps and steps", SETTINGS, run,
              tables, plot, linf_success_rates=linf_success_rates)
