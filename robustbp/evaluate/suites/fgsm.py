"""The fgsm suite: error under one step x + ε·sign(∇ₓL) and x + ε·∇ₓL per ε (IBP paper, later version, Fig. 2)."""
from __future__ import annotations

from robustbp.evaluate import checks
from robustbp.evaluate.metrics import gradient_noise_curve
from robustbp.evaluate.report import format_table, new_figure, percent
from robustbp.evaluate.suites.base import Evaluation, Setting, Suite, same_eps

SETTINGS = {
    "fgsm_eps_sign": Setting(full=(0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255),
                             quick=(0.0, 8 / 255, 32 / 255)),
    "fgsm_eps_gradient": Setting(full=(0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), quick=(0.0, 1.0, 10.0)),
}
DIRECTIONS = {"sign": "eps*sign(grad)", "gradient": "eps*grad"}


def run(evaluation: Evaluation) -> dict:
    s, x, y = evaluation.settings, evaluation.x, evaluation.y
    models, warnings = {}, []
    for name, model in evaluation.models.items():
        health, health_warnings = evaluation.gradient_health(name)
        sign = gradient_noise_curve(model, x, y, s.fgsm_eps_sign, "sign")
        gradient = gradient_noise_curve(model, x, y, s.fgsm_eps_gradient, "gradient")
        models[name] = {"sign": sign, "gradient": gradient, "gradient_health": health}
        warnings += health_warnings
        warnings += checks.budget_warnings(name, "FGSM", "eps", sign["eps"], sign["attack_success_rate"], evaluation.n)
    settings = {"eps_sign": list(s.fgsm_eps_sign), "eps_gradient": list(s.fgsm_eps_gradient)}
    return {"settings": settings, "models": models, "warnings": warnings}


def tables(result: dict) -> list[str]:
    rows = [[name, label, f"{e:.4g}", percent(error), percent(d), percent(r)]
            for name, m in result["models"].items()
            for direction, label in DIRECTIONS.items()
            for e, error, d, r in zip(m[direction]["eps"], m[direction]["error"], m[direction]["drop"],
                                      m[direction]["attack_success_rate"])]
    return [format_table("fgsm: one gradient step x + eps*sign(grad L) / x + eps*grad L",
                         ["model", "step", "eps", "error %", "drop (points)", "success %"], rows)]


def plot(result: dict):
    figure, axes = new_figure(2)
    for axis, direction, title in zip(axes, DIRECTIONS, ("x + eps*sign(grad L)", "x + eps*grad L")):
        for name, m in result["models"].items():
            axis.plot(m[direction]["eps"], [100 * e for e in m[direction]["error"]], marker="o", label=name)
        axis.set(xlabel="eps", ylabel="test error %", title=title)
        axis.legend()
    return figure


def linf_success_rates(result: dict, name: str, eps: float) -> dict[str, float]:
    curve = result["models"][name]["sign"]
    return {"FGSM": rate for e, rate in zip(curve["eps"], curve["attack_success_rate"]) if same_eps(e, eps)}


SUITE = Suite("fgsm", "error under one gradient step x + eps*sign(grad L) and x + eps*grad L per eps",
              SETTINGS, run, tables, plot, linf_success_rates=linf_success_rates)
