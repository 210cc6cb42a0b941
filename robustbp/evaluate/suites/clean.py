"""The clean suite: accuracy and error on the unperturbed points."""
from __future__ import annotations

from robustbp.evaluate.metrics import accuracy
from robustbp.evaluate.report import format_table, new_figure, percent
from robustbp.evaluate.suites.base import Evaluation, Suite


def run(evaluation: Evaluation) -> dict:
    models = {}
    for name, model in evaluation.models.items():
        fraction = accuracy(model, evaluation.x, evaluation.y)
        models[name] = {"accuracy": fraction, "error": 1 - fraction, "n_correct": round(fraction * evaluation.n),
                        "n": evaluation.n}
    return {"settings": {}, "models": models, "warnings": []}


def tables(result: dict) -> list[str]:
    rows = [[name, percent(m["accuracy"]), percent(m["error"]), f"{m['n_correct']}/{m['n']}"]
            for name, m in result["models"].items()]
    return [format_table("clean", ["model", "accuracy %", "error %", "correct"], rows)]


def plot(result: dict):
    models = result["models"]
    figure, (axis,) = new_figure()
    axis.bar(list(models), [100 * m["error"] for m in models.values()])
    axis.set(ylabel="test error %", title="clean error")
    return figure


SUITE = Suite("clean", "accuracy and error on the test points as they are", {}, run, tables, plot)
