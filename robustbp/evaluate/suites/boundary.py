"""The boundary suite: L2 distance to the decision boundary, points all models get right (spectral paper Fig. 4)."""
from __future__ import annotations

import math

import numpy as np
import torch

from robustbp.evaluate.boundary import boundary_distance
from robustbp.evaluate.metrics import predict
from robustbp.evaluate.report import format_table, new_figure
from robustbp.evaluate.suites.base import Evaluation, Setting, Suite

SETTINGS = {
    # the first boundary_points points all models classify correctly (None: all of them; the paper used
    # 8000-9000 on a GPU), boundary_samples points per sphere
    "boundary_points": Setting(full=200, quick=16, none_means_all=True),
    "boundary_samples": Setting(full=256, quick=200),
    "boundary_rel_tol": Setting(full=1e-2),
}


def distance_statistics(distances: torch.Tensor) -> dict:
    """n, n_no_change (no class change up to the largest radius), and quartiles, mean, min, max of the others."""
    finite = distances[torch.isfinite(distances)].cpu().numpy()
    stats = {"n": int(len(distances)), "n_no_change": int(len(distances) - len(finite))}
    if len(finite):
        q1, median, q3 = np.percentile(finite, [25, 50, 75])
        return {**stats, "q1": float(q1), "median": float(median), "q3": float(q3), "mean": float(finite.mean()),
                "min": float(finite.min()), "max": float(finite.max())}
    return {**stats, **dict.fromkeys(("q1", "median", "q3", "mean", "min", "max"), math.nan)}


def run(evaluation: Evaluation) -> dict:
    s, x, y = evaluation.settings, evaluation.x, evaluation.y
    common = torch.ones(evaluation.n, dtype=torch.bool, device=x.device)
    for model in evaluation.models.values():
        common &= predict(model, x) == y
    indices = torch.nonzero(common).flatten()[: s.boundary_points]
    models = {}
    for name, model in evaluation.models.items():
        distances = boundary_distance(model, x[indices], n_samples=s.boundary_samples, rel_tol=s.boundary_rel_tol,
                                      generator=evaluation.generator()) if len(indices) else torch.zeros(0)
        models[name] = {**distance_statistics(distances), "distances": [float(d) for d in distances]}
    settings = {"norm": "l2", "n_samples": s.boundary_samples, "rel_tol": s.boundary_rel_tol,
                "max_points": s.boundary_points, "point_indices": [int(i) for i in indices]}
    return {"settings": settings, "models": models, "warnings": []}


def tables(result: dict) -> list[str]:
    rows = [[name, m["n"], f"{m['q1']:.4g}", f"{m['median']:.4g}", f"{m['q3']:.4g}", f"{m['mean']:.4g}",
             m["n_no_change"]] for name, m in result["models"].items()]
    return [format_table("boundary: L2 distance to the decision boundary (points every model gets right)",
                         ["model", "points", "q1", "median", "q3", "mean", "no change"], rows)]


def plot(result: dict):
    models = result["models"]
    figure, (axis,) = new_figure()
    data = [[d for d in m["distances"] if math.isfinite(d)] for m in models.values()]
    if any(data):
        axis.boxplot([d if d else [math.nan] for d in data], tick_labels=list(models))
    axis.set(ylabel="L2 distance to the boundary",
             title=f"decision boundary ({len(result['settings']['point_indices'])} points)")
    return figure


SUITE = Suite("boundary", "L2 distance to the decision boundary on the points every model gets right", SETTINGS,
              run, tables, plot)
