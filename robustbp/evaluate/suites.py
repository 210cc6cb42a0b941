"""The evaluation suites and `evaluate_runs`, the one function `robustbp evaluate` calls.

    from robustbp.evaluate import evaluate_runs
    results = evaluate_runs({"bp": model_a, "ibp": model_b}, images, labels,
                            ["clean", "noise", "pgd"], Path("runs/eval"), seed=0, quick=True)

Every model is evaluated on the same points, with the same random draws (noise, random starts,
sampled spheres) for a given seed. For each suite a plain-text table is printed and
`<suite>.json` and `<suite>.png` are written, atomically, under out_dir; warnings against false
robustness (see `robustbp.evaluate.checks`) are printed under the table they concern.

| suite    | what                                                                  | paper            |
|----------|-----------------------------------------------------------------------|------------------|
| clean    | accuracy and error                                                    |                  |
| noise    | error under clip(x + N(0, σ²)) per σ, drop from clean accuracy        | spectral Fig. 3, IBP Fig. 4 |
| fgsm     | error under x + ε·sign(∇ₓL) and x + ε·∇ₓL per ε                      | IBP (later) Fig. 2 |
| pgd      | PGD L∞, PGD L2 and TPGD by number of steps                            | spectral Fig. 3  |
| linbp    | PGD success rate, BP vs LinBP, steps 10/20/100, ε 8/255 and 16/255    | LinBP Table I    |
| square   | Square attack (ART) by number of queries                              | spectral Fig. 3  |
| apgd     | Auto-PGD (ART) success rate, BP vs LinBP, ε 8/255 and 16/255          | LinBP Table II   |
| boundary | distance to the decision boundary on points all models get right      | spectral Fig. 4  |
| spectral | power-iteration error vs iterations, bound, time per batch           | spectral Fig. 5  |
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robustbp.modes import eval_mode
from robustbp.validation import MissingDependency, check_images, check_labels
from robustbp.attacks.art_adapter import apgd, require_art, square
from robustbp.attacks.gradients import gradient_health
from robustbp.methods.linbp import relu_calls
from robustbp.attacks.gradient_attacks import pgd_checkpoints
from robustbp.evaluate import checks
from robustbp.evaluate.boundary import boundary_distance
from robustbp.evaluate.metrics import (
    attack_success_rate,
    gradient_noise_curve,
    noise_curve,
    predict,
)
from robustbp.evaluate.report import format_table, new_figure, percent, write_json, write_png
from robustbp.evaluate.spectral import spectral_error_curve, spectral_timing

SUITES = ("clean", "noise", "fgsm", "pgd", "linbp", "square", "apgd", "boundary", "spectral")
GRADIENT_SUITES = ("fgsm", "pgd", "linbp", "apgd")


@dataclass(frozen=True)
class SuiteSettings:
    """Budgets of every suite. FULL follows the papers; QUICK runs in seconds on small models."""

    max_points: int | None = None  # evaluate the first max_points images (None: all), in every suite
    noise_sigmas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
    fgsm_eps_sign: tuple[float, ...] = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255)
    fgsm_eps_gradient: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    # spectral paper §4.2.2: δ = 32/255, η = 2/255, strength by the number of iterations
    pgd_eps_linf: float = 32 / 255
    pgd_step_linf: float = 2 / 255
    pgd_eps_l2: float = 1.0
    pgd_step_l2: float = 0.1
    pgd_steps: tuple[int, ...] = (1, 2, 5, 10, 20)
    pgd_restarts: int = 1
    # LinBP paper Table I: step 1/255, best of 5 restarts
    linbp_eps: tuple[float, ...] = (8 / 255, 16 / 255)
    linbp_step: float = 1 / 255
    linbp_steps: tuple[int, ...] = (10, 20, 100)
    linbp_restarts: int = 5
    linbp_first: int = 1
    square_eps: float = 32 / 255
    square_queries: tuple[int, ...] = (10, 100, 1000)
    square_p_init: float = 0.8
    # LinBP paper Table II: Auto-PGD, best of 5 restarts
    apgd_eps: tuple[float, ...] = (8 / 255, 16 / 255)
    apgd_steps: int = 100
    apgd_restarts: int = 5
    # the first boundary_points points all models classify correctly (None: all of them; the paper
    # used 8000-9000 on a GPU), boundary_samples points per sphere
    boundary_points: int | None = 200
    boundary_samples: int = 256
    boundary_rel_tol: float = 1e-2
    spectral_points: int = 256
    spectral_iters: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
    spectral_batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    spectral_repeats: int = 3


OPTIONAL_COUNTS = ("max_points", "boundary_points")  # None means "all"


def override_settings(base: SuiteSettings, assignments: Sequence[str]) -> SuiteSettings:
    """`base` with fields replaced from "name=value" strings, as `robustbp evaluate --set` gives
    them: a tuple field takes a comma-separated list, an optional count takes "none". Every
    number must be finite and non-negative (ε, σ, steps, sizes); counts must be whole numbers."""
    fields = {f.name: f for f in dataclasses.fields(SuiteSettings)}
    changes = {}
    for assignment in assignments:
        name, sep, text = assignment.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ValueError(f"--set {assignment!r}: expected NAME=VALUE with NAME one of {', '.join(fields)}")
        default = getattr(base, name)
        optional = name in OPTIONAL_COUNTS
        whole = optional or isinstance(default, int) or (
            isinstance(default, tuple) and all(isinstance(v, int) for v in default)
        )
        parse = int if whole else float
        try:
            if optional and text.strip().lower() == "none":
                value = None
            elif isinstance(default, tuple):
                value = tuple(parse(part) for part in text.split(",") if part.strip())
            else:
                value = parse(text)
        except ValueError:
            raise ValueError(f"--set {name}: {text!r} is not {'a whole number' if whole else 'a number'}"
                             f"{' list' if isinstance(default, tuple) else ''}") from None
        numbers = value if isinstance(value, tuple) else () if value is None else (value,)
        if not numbers and isinstance(default, tuple):
            raise ValueError(f"--set {name}: give at least one value")
        bad = [v for v in numbers if not math.isfinite(v) or v < 0]
        if bad:
            raise ValueError(f"--set {name}: values must be finite and non-negative, got {bad[0]}")
        changes[name] = value
    return dataclasses.replace(base, **changes)


FULL = SuiteSettings()
QUICK = SuiteSettings(
    max_points=256,
    noise_sigmas=(0.0, 0.1, 0.3),
    fgsm_eps_sign=(0.0, 8 / 255, 32 / 255),
    fgsm_eps_gradient=(0.0, 1.0, 10.0),
    pgd_steps=(1, 5),
    linbp_steps=(2, 5),
    linbp_restarts=1,
    square_queries=(20, 100),
    apgd_steps=10,
    apgd_restarts=1,
    boundary_points=16,
    boundary_samples=200,
    boundary_rel_tol=1e-2,
    spectral_points=16,
    spectral_iters=(1, 2, 5),
    spectral_batch_sizes=(1, 4),
    spectral_repeats=1,
)


@dataclass
class _Run:
    """What every suite of one evaluation shares."""

    models: dict[str, nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    settings: SuiteSettings
    seed: int
    health: dict = dataclasses.field(default_factory=dict)
    health_warned: set = dataclasses.field(default_factory=set)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def generator(self) -> torch.Generator:
        """A fresh generator seeded with the run's seed: each model and setting gets the same draws."""
        return torch.Generator(device=self.x.device).manual_seed(self.seed)

    def gradient_health(self, name: str) -> tuple[dict, list[str]]:
        """Input-gradient health of a model (cached) and its warnings the first time they are asked for."""
        if name not in self.health:
            self.health[name] = gradient_health(self.models[name], self.x, self.y)
        if name in self.health_warned:
            return self.health[name], []
        self.health_warned.add(name)
        return self.health[name], checks.gradient_warnings(name, self.health[name])


def eps_label(eps: float) -> str:
    """8/255 for multiples of 1/255, else the number."""
    k = eps * 255
    return f"{round(k)}/255" if eps > 0 and abs(k - round(k)) < 1e-6 else f"{eps:g}"


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).float().mean())


def _adversarial_rows(model, x, x_adv_list, y, clean):
    """accuracy, drop and attack success rate for each adversarial version of x."""
    accuracy = [_accuracy(model, x_adv, y) for x_adv in x_adv_list]
    return {
        "accuracy": accuracy,
        "drop": [clean - a for a in accuracy],
        "attack_success_rate": [attack_success_rate(model, x, x_adv, y) for x_adv in x_adv_list],
    }


def _batched_pgd(model, run: _Run, eps, step, steps, norm, restarts, loss, gradient, first) -> list[torch.Tensor]:
    """pgd_checkpoints over batches of 256, one generator for the whole pass."""
    generator = run.generator()
    per_batch = [
        pgd_checkpoints(
            model, run.x[i : i + 256], run.y[i : i + 256], eps, step, steps, norm, restarts, loss, gradient, first,
            generator,
        )
        for i in range(0, run.n, 256)
    ]
    return [torch.cat([batch[k] for batch in per_batch]) for k in range(len(steps))]


# --- suites: each returns {"settings": ..., "models": {name: ...}, "warnings": [...]} ---------------


def _run_clean(run: _Run) -> dict:
    models = {}
    for name, model in run.models.items():
        correct = int((predict(model, run.x) == run.y).sum())
        models[name] = {"accuracy": correct / run.n, "error": 1 - correct / run.n, "n_correct": correct, "n": run.n}
    return {"settings": {}, "models": models, "warnings": []}


def _run_noise(run: _Run) -> dict:
    sigmas = list(run.settings.noise_sigmas)
    models = {name: noise_curve(model, run.x, run.y, sigmas, run.seed) for name, model in run.models.items()}
    return {"settings": {"sigma": sigmas, "seed": run.seed}, "models": models, "warnings": []}


def _run_fgsm(run: _Run) -> dict:
    s = run.settings
    models, warnings = {}, []
    for name, model in run.models.items():
        health, health_warnings = run.gradient_health(name)
        sign = gradient_noise_curve(model, run.x, run.y, s.fgsm_eps_sign, "sign")
        grad = gradient_noise_curve(model, run.x, run.y, s.fgsm_eps_gradient, "gradient")
        models[name] = {"sign": sign, "gradient": grad, "gradient_health": health}
        warnings += health_warnings
        warnings += checks.budget_warnings(name, "FGSM", "eps", sign["eps"], sign["attack_success_rate"], run.n)
    settings = {"eps_sign": list(s.fgsm_eps_sign), "eps_gradient": list(s.fgsm_eps_gradient)}
    return {"settings": settings, "models": models, "warnings": warnings}


def _pgd_attacks(s: SuiteSettings) -> list[dict]:
    return [
        {"attack": "pgd_linf", "norm": "linf", "loss": "ce", "eps": s.pgd_eps_linf, "step": s.pgd_step_linf},
        {"attack": "pgd_l2", "norm": "l2", "loss": "ce", "eps": s.pgd_eps_l2, "step": s.pgd_step_l2},
        {"attack": "tpgd", "norm": "linf", "loss": "kl", "eps": s.pgd_eps_linf, "step": s.pgd_step_linf},
    ]


def _run_pgd(run: _Run) -> dict:
    s = run.settings
    steps = list(s.pgd_steps)
    models, warnings = {}, []
    for name, model in run.models.items():
        health, health_warnings = run.gradient_health(name)
        warnings += health_warnings
        clean = _accuracy(model, run.x, run.y)
        entry = {"clean_accuracy": clean, "gradient_health": health}
        for attack in _pgd_attacks(s):
            adversarial = _batched_pgd(
                model, run, attack["eps"], attack["step"], steps, attack["norm"], s.pgd_restarts, attack["loss"],
                "bp", 1,
            )
            entry[attack["attack"]] = {"steps": steps, **_adversarial_rows(model, run.x, adversarial, run.y, clean)}
            warnings += checks.budget_warnings(
                name, attack["attack"].upper(), "steps", steps, entry[attack["attack"]]["attack_success_rate"], run.n
            )
        models[name] = entry
    settings = {"attacks": _pgd_attacks(s), "steps": steps, "restarts": s.pgd_restarts, "random_start": True}
    return {"settings": settings, "models": models, "warnings": warnings}


def _gradients(name: str, entry: dict, warnings: list) -> tuple[str, ...]:
    """("bp", "linbp"), or ("bp",) with a warning for a model that applies no ReLU."""
    if entry["has_relu"]:
        return ("bp", "linbp")
    warnings.append(f"{name}: the model applies no ReLU, so LinBP would be plain BP; only BP is reported")
    return ("bp",)


def _run_linbp(run: _Run) -> dict:
    s = run.settings
    steps, eps_values = list(s.linbp_steps), list(s.linbp_eps)
    models, warnings = {}, []
    for name, model in run.models.items():
        health, health_warnings = run.gradient_health(name)
        warnings += health_warnings
        entry = {"gradient_health": health, "has_relu": relu_calls(model, run.x[:1]) > 0}
        for gradient in _gradients(name, entry, warnings):
            label = "PGD-BP" if gradient == "bp" else f"PGD-LinBP(first={s.linbp_first})"
            table = []  # table[i][j]: success rate at eps_values[i], steps[j]
            for eps in eps_values:
                adversarial = _batched_pgd(
                    model, run, eps, s.linbp_step, steps, "linf", s.linbp_restarts, "ce", gradient, s.linbp_first
                )
                table.append([attack_success_rate(model, run.x, x_adv, run.y) for x_adv in adversarial])
                warnings += checks.budget_warnings(name, f"{label} eps={eps_label(eps)}", "steps", steps,
                                                   table[-1], run.n, check_flat=False)
            for j, k in enumerate(steps):
                warnings += checks.budget_warnings(name, f"{label} steps={k}", "eps", eps_values,
                                                   [row[j] for row in table], run.n, check_flat=False)
            entry[gradient] = {"attack_success_rate": table}
        models[name] = entry
    settings = {
        "eps": eps_values, "step": s.linbp_step, "steps": steps, "restarts": s.linbp_restarts,
        "first": s.linbp_first, "norm": "linf", "random_start": True,
    }
    return {"settings": settings, "models": models, "warnings": warnings}


def _run_square(run: _Run) -> dict:
    s = run.settings
    queries = list(s.square_queries)
    models, warnings = {}, []
    for name, model in run.models.items():
        clean = _accuracy(model, run.x, run.y)
        adversarial = [
            square(model, run.x, run.y, s.square_eps, q, "linf", s.square_p_init, seed=run.seed) for q in queries
        ]
        models[name] = {"queries": queries, "clean_accuracy": clean,
                        **_adversarial_rows(model, run.x, adversarial, run.y, clean)}
        # a random search needs orders of magnitude more queries to show a rise (quick mode: 20 → 100)
        warnings += checks.budget_warnings(name, "Square", "queries", queries,
                                           models[name]["attack_success_rate"], run.n,
                                           check_flat=max(queries) >= 100 * min(queries))
    settings = {"eps": s.square_eps, "norm": "linf", "queries": queries, "p_init": s.square_p_init}
    return {"settings": settings, "models": models, "warnings": warnings}


def _run_apgd(run: _Run) -> dict:
    s = run.settings
    eps_values = list(s.apgd_eps)
    models, warnings = {}, []
    for name, model in run.models.items():
        health, health_warnings = run.gradient_health(name)
        warnings += health_warnings
        entry = {"gradient_health": health, "has_relu": relu_calls(model, run.x[:1]) > 0}
        for gradient in _gradients(name, entry, warnings):
            rates = []
            for eps in eps_values:
                x_adv = apgd(model, run.x, run.y, eps, s.apgd_steps, "linf", s.apgd_restarts, "ce", gradient,
                             s.linbp_first, seed=run.seed)
                rates.append(attack_success_rate(model, run.x, x_adv, run.y))
            entry[gradient] = {"attack_success_rate": rates}
            label = "APGD-BP" if gradient == "bp" else f"APGD-LinBP(first={s.linbp_first})"
            warnings += checks.budget_warnings(name, label, "eps", eps_values, rates, run.n, check_flat=False)
        models[name] = entry
    settings = {"eps": eps_values, "steps": s.apgd_steps, "restarts": s.apgd_restarts, "first": s.linbp_first,
                "norm": "linf", "loss": "ce"}
    return {"settings": settings, "models": models, "warnings": warnings}


def _run_boundary(run: _Run) -> dict:
    s = run.settings
    common = torch.ones(run.n, dtype=torch.bool, device=run.x.device)
    for model in run.models.values():
        common &= predict(model, run.x) == run.y
    indices = torch.nonzero(common).flatten()
    if s.boundary_points is not None:
        indices = indices[: s.boundary_points]
    models = {}
    for name, model in run.models.items():
        distances = boundary_distance(
            model, run.x[indices], n_samples=s.boundary_samples, rel_tol=s.boundary_rel_tol, generator=run.generator()
        ) if len(indices) else torch.zeros(0)
        finite = distances[torch.isfinite(distances)].cpu().numpy()
        stats = {"n": int(len(indices)), "n_no_change": int((~torch.isfinite(distances)).sum())}
        if len(finite):
            q1, median, q3 = np.percentile(finite, [25, 50, 75])
            stats.update(q1=float(q1), median=float(median), q3=float(q3), mean=float(finite.mean()),
                         min=float(finite.min()), max=float(finite.max()))
        else:
            stats.update(q1=math.nan, median=math.nan, q3=math.nan, mean=math.nan, min=math.nan, max=math.nan)
        models[name] = {**stats, "distances": [float(d) for d in distances]}
    settings = {"norm": "l2", "n_samples": s.boundary_samples, "rel_tol": s.boundary_rel_tol,
                "max_points": s.boundary_points, "point_indices": [int(i) for i in indices]}
    return {"settings": settings, "models": models, "warnings": []}


def _run_spectral(run: _Run) -> dict:
    from robustbp.passes import NotLinearizable, UnsupportedModule

    s = run.settings
    x_error = run.x[: s.spectral_points]
    batch_sizes = [b for b in s.spectral_batch_sizes if b <= run.n] or [run.n]
    models = {}
    for name, model in run.models.items():
        try:
            models[name] = {
                "error": spectral_error_curve(model, x_error, s.spectral_iters, run.seed),
                "timing": spectral_timing(model, run.x, batch_sizes, 1, s.spectral_repeats, run.seed),
            }
        except (NotLinearizable, UnsupportedModule) as error:
            models[name] = {"unavailable": f"{type(error).__name__}: {error}"}
    settings = {"points": int(x_error.shape[0]), "n_iter": list(s.spectral_iters), "batch_sizes": batch_sizes,
                "timing_n_iter": 1, "repeats": s.spectral_repeats, "conv_norm": "reshaped kernel"}
    warnings = [f"{name}: spectral suite skipped ({m['unavailable']})" for name, m in models.items()
                if "unavailable" in m]
    return {"settings": settings, "models": models, "warnings": warnings}


# --- tables -----------------------------------------------------------------------------------


def _tables(suite: str, result: dict) -> list[str]:
    models = result["models"]
    rows: list[list] = []
    if suite == "clean":
        rows = [[n, percent(m["accuracy"]), percent(m["error"]), f"{m['n_correct']}/{m['n']}"]
                for n, m in models.items()]
        return [format_table("clean", ["model", "accuracy %", "error %", "correct"], rows)]
    if suite == "noise":
        for n, m in models.items():
            rows += [[n, f"{sig:g}", percent(a), percent(e), percent(d)]
                     for sig, a, e, d in zip(m["sigma"], m["accuracy"], m["error"], m["drop"])]
        return [format_table("noise: x + N(0, sigma^2), clipped to [0, 1]",
                             ["model", "sigma", "accuracy %", "error %", "drop (points)"], rows)]
    if suite == "fgsm":
        for n, m in models.items():
            for direction, label in (("sign", "eps*sign(grad)"), ("gradient", "eps*grad")):
                c = m[direction]
                rows += [[n, label, f"{e:.4g}", percent(err), percent(d), percent(r)]
                         for e, err, d, r in zip(c["eps"], c["error"], c["drop"], c["attack_success_rate"])]
        return [format_table("fgsm: one gradient step x + eps*sign(grad L) / x + eps*grad L",
                             ["model", "step", "eps", "error %", "drop (points)", "success %"], rows)]
    if suite == "pgd":
        settings = {a["attack"]: a for a in result["settings"]["attacks"]}
        for n, m in models.items():
            for attack, a in settings.items():
                c = m[attack]
                rows += [[n, attack, f"{a['eps']:.4g}", f"{a['step']:.4g}", k, percent(acc), percent(d), percent(r)]
                         for k, acc, d, r in zip(c["steps"], c["accuracy"], c["drop"], c["attack_success_rate"])]
        return [format_table("pgd: PGD Linf, PGD L2, TPGD (random start)",
                             ["model", "attack", "eps", "step", "steps", "accuracy %", "drop (points)", "success %"],
                             rows)]
    if suite == "linbp":
        st = result["settings"]
        for n, m in models.items():
            for i, eps in enumerate(st["eps"]):
                rows += [[n, eps_label(eps), k, percent(m["bp"]["attack_success_rate"][i][j]),
                          percent(m["linbp"]["attack_success_rate"][i][j]) if "linbp" in m else "no ReLU"]
                         for j, k in enumerate(st["steps"])]
        title = (f"linbp: PGD Linf success rate on correctly classified points, step {eps_label(st['step'])}, "
                 f"best of {st['restarts']} restarts, LinBP from ReLU {st['first']}")
        return [format_table(title, ["model", "eps", "steps", "BP %", "LinBP %"], rows)]
    if suite == "square":
        st = result["settings"]
        for n, m in models.items():
            rows += [[n, eps_label(st["eps"]), q, percent(a), percent(d), percent(r)]
                     for q, a, d, r in zip(m["queries"], m["accuracy"], m["drop"], m["attack_success_rate"])]
        return [format_table("square: gradient-free Square attack (ART), Linf",
                             ["model", "eps", "queries", "accuracy %", "drop (points)", "success %"], rows)]
    if suite == "apgd":
        st = result["settings"]
        for n, m in models.items():
            rows += [[n, eps_label(eps), st["steps"], percent(m["bp"]["attack_success_rate"][i]),
                      percent(m["linbp"]["attack_success_rate"][i]) if "linbp" in m else "no ReLU"]
                     for i, eps in enumerate(st["eps"])]
        title = f"apgd: Auto-PGD (ART) success rate, best of {st['restarts']} restarts, LinBP from ReLU {st['first']}"
        return [format_table(title, ["model", "eps", "steps", "BP %", "LinBP %"], rows)]
    if suite == "boundary":
        rows = [[n, m["n"], f"{m['q1']:.4g}", f"{m['median']:.4g}", f"{m['q3']:.4g}", f"{m['mean']:.4g}",
                 m["n_no_change"]] for n, m in models.items()]
        return [format_table("boundary: L2 distance to the decision boundary (points every model gets right)",
                             ["model", "points", "q1", "median", "q3", "mean", "no change"], rows)]
    if suite == "spectral":
        error_rows, time_rows = [], []
        for n, m in models.items():
            if "unavailable" in m:
                error_rows.append([n, "-", m["unavailable"], "", ""])
                continue
            e, t = m["error"], m["timing"]
            error_rows += [[n, k, f"{mean:.3g}", f"{median:.3g}", f"{e['bound_rel_error_mean']:.3g}"]
                           for k, mean, median in zip(e["n_iter"], e["estimate_rel_error_mean"],
                                                      e["estimate_rel_error_median"])]
            time_rows += [[n, b, f"{f:.2e}", f"{es:.2e}", f"{bo:.2e}", f"{ex:.2e}"]
                          for b, f, es, bo, ex in zip(t["batch_size"], t["forward_s"], t["estimate_s"],
                                                      t["bound_s"], t["exact_s"])]
        return [
            format_table("spectral: relative error |s - s_exact| / s_exact of the Jacobian spectral norm",
                         ["model", "power iterations", "estimate mean", "estimate median", "bound mean"],
                         error_rows),
            format_table("spectral: seconds per batch",
                         ["model", "batch", "forward", "estimate (1 it.)", "bound", "exact"], time_rows),
        ]
    raise ValueError(f"unknown suite {suite!r}")


# --- plots ------------------------------------------------------------------------------------


def _plot(suite: str, result: dict):
    models, st = result["models"], result["settings"]
    if suite == "clean":
        figure, (ax,) = new_figure()
        names = list(models)
        ax.bar(names, [100 * models[n]["error"] for n in names])
        ax.set_ylabel("test error %")
        ax.set_title("clean error")
        return figure
    if suite == "noise":
        figure, (ax,) = new_figure()
        for n, m in models.items():
            ax.plot(m["sigma"], [100 * d for d in m["drop"]], marker="o", label=n)
        ax.set(xlabel="noise sigma", ylabel="accuracy drop (points)", title="Gaussian noise")
        ax.legend()
        return figure
    if suite == "fgsm":
        figure, axes = new_figure(2)
        for ax, direction, title in zip(axes, ("sign", "gradient"), ("x + eps*sign(grad L)", "x + eps*grad L")):
            for n, m in models.items():
                ax.plot(m[direction]["eps"], [100 * e for e in m[direction]["error"]], marker="o", label=n)
            ax.set(xlabel="eps", ylabel="test error %", title=title)
            ax.legend()
        return figure
    if suite == "pgd":
        attacks = st["attacks"]
        figure, axes = new_figure(len(attacks))
        for ax, attack in zip(axes, attacks):
            for n, m in models.items():
                ax.plot(m[attack["attack"]]["steps"], [100 * d for d in m[attack["attack"]]["drop"]], marker="o",
                        label=n)
            ax.set(xlabel="steps", ylabel="accuracy drop (points)",
                   title=f"{attack['attack']} eps={attack['eps']:.3g}")
            ax.legend()
        return figure
    if suite == "linbp":
        figure, axes = new_figure(len(st["eps"]))
        for i, (ax, eps) in enumerate(zip(axes, st["eps"])):
            for n, m in models.items():
                line, = ax.plot(st["steps"], [100 * r for r in m["bp"]["attack_success_rate"][i]], marker="o",
                                label=f"{n} BP")
                if "linbp" not in m:
                    continue
                ax.plot(st["steps"], [100 * r for r in m["linbp"]["attack_success_rate"][i]], marker="s",
                        linestyle="--", color=line.get_color(), label=f"{n} LinBP")
            ax.set(xlabel="steps", ylabel="attack success %", title=f"PGD eps={eps_label(eps)}")
            ax.legend()
        return figure
    if suite == "square":
        figure, (ax,) = new_figure()
        for n, m in models.items():
            ax.plot(m["queries"], [100 * d for d in m["drop"]], marker="o", label=n)
        ax.set(xlabel="queries", ylabel="accuracy drop (points)", xscale="log",
               title=f"Square eps={eps_label(st['eps'])}")
        ax.legend()
        return figure
    if suite == "apgd":
        figure, (ax,) = new_figure()
        for n, m in models.items():
            line, = ax.plot(st["eps"], [100 * r for r in m["bp"]["attack_success_rate"]], marker="o", label=f"{n} BP")
            if "linbp" not in m:
                continue
            ax.plot(st["eps"], [100 * r for r in m["linbp"]["attack_success_rate"]], marker="s", linestyle="--",
                    color=line.get_color(), label=f"{n} LinBP")
        ax.set(xlabel="eps", ylabel="attack success %", title=f"Auto-PGD, {st['steps']} steps")
        ax.legend()
        return figure
    if suite == "boundary":
        figure, (ax,) = new_figure()
        names = list(models)
        data = [[d for d in models[n]["distances"] if math.isfinite(d)] for n in names]
        if any(data):
            ax.boxplot([d if d else [math.nan] for d in data], tick_labels=names)
        ax.set(ylabel="L2 distance to the boundary", title=f"decision boundary ({len(st['point_indices'])} points)")
        return figure
    if suite == "spectral":
        figure, (ax_error, ax_time) = new_figure(2)
        for n, m in models.items():
            if "unavailable" in m:
                continue
            e, t = m["error"], m["timing"]
            line, = ax_error.plot(e["n_iter"], e["estimate_rel_error_mean"], marker="o", label=f"{n} estimate")
            ax_error.axhline(e["bound_rel_error_mean"], linestyle="--", color=line.get_color(), label=f"{n} bound")
            for key, marker in (("estimate_s", "o"), ("bound_s", "^"), ("exact_s", "s")):
                ax_time.plot(t["batch_size"], t[key], marker=marker, label=f"{n} {key[:-2]}")
        ax_error.set(xlabel="power iterations", ylabel="mean relative error", ylim=(0, None),
                     title="spectral norm: estimate vs bound")
        ax_time.set(xlabel="batch size", ylabel="seconds per batch", xscale="log", yscale="log", title="cost")
        ax_time.set_xticks(st["batch_sizes"], [str(b) for b in st["batch_sizes"]])
        ax_time.minorticks_off()
        ax_error.legend(fontsize="small")
        ax_time.legend(fontsize="small")
        return figure
    raise ValueError(f"unknown suite {suite!r}")


# --- cross-suite check and the entry point ----------------------------------------------------------


def _square_versus_gradient(results: dict, run: _Run) -> list[str]:
    """Check 2: Square (at its largest query budget) against every gradient attack at the same Linf ε."""
    if "square" not in results:
        return []
    eps = results["square"]["settings"]["eps"]
    same = lambda value: abs(value - eps) < 1e-9  # noqa: E731
    warnings = []
    for name in run.models:
        rates = {}
        if "fgsm" in results:
            c = results["fgsm"]["models"][name]["sign"]
            rates.update({"FGSM": r for e, r in zip(c["eps"], c["attack_success_rate"]) if same(e)})
        if "pgd" in results:
            for attack in results["pgd"]["settings"]["attacks"]:
                if attack["norm"] == "linf" and same(attack["eps"]):
                    rates[attack["attack"].upper()] = results["pgd"]["models"][name][attack["attack"]][
                        "attack_success_rate"][-1]
        for suite, label in (("linbp", "PGD"), ("apgd", "APGD")):
            if suite in results:
                for i, e in enumerate(results[suite]["settings"]["eps"]):
                    if same(e):
                        for gradient in ("bp", "linbp"):
                            if gradient not in results[suite]["models"][name]:
                                continue
                            rate = results[suite]["models"][name][gradient]["attack_success_rate"][i]
                            rates[f"{label}-{gradient.upper() if gradient == 'bp' else 'LinBP'}"] = (
                                rate[-1] if isinstance(rate, list) else rate)
        square_rate = results["square"]["models"][name]["attack_success_rate"][-1]
        warnings += checks.square_warnings(name, eps, "Linf", square_rate, rates, run.n)
    return warnings


def _validate(models, images, labels, suites, out_dir, seed) -> list[str]:
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict of name -> nn.Module")
    for name, model in models.items():
        if not isinstance(name, str) or not isinstance(model, nn.Module):
            raise ValueError(f"models must map names (str) to nn.Module, got {name!r} -> {type(model).__name__}")
    check_images(images, "images")
    check_labels(labels, images, "labels")
    if isinstance(suites, str):
        suites = [suites]
    suites = list(suites)
    if not suites:
        raise ValueError(f"no suite given; choose from {', '.join(SUITES)}")
    for suite in suites:
        if suite not in SUITES:
            raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a folder")
    if "square" in suites and images.dim() != 4:
        raise ValueError(f"the square suite needs images of shape (N, C, H, W), got {tuple(images.shape)}")
    if {"square", "apgd"} & set(suites):
        require_art()
    n_classes_needed = int(labels.max()) + 1
    for name, model in models.items():
        try:
            with eval_mode(model), torch.no_grad():
                logits = model(images[:1])
        except RuntimeError as error:
            raise ValueError(f"model {name!r} cannot process images of shape {tuple(images.shape[1:])}: {error}") from None
        if logits.dim() != 2 or logits.shape[0] != 1:
            raise ValueError(f"model {name!r} must map (N, ...) images to (N, classes) logits, "
                             f"got output shape {tuple(logits.shape)} for one image")
        if logits.shape[1] < n_classes_needed:
            raise ValueError(f"model {name!r} has {logits.shape[1]} outputs but the labels go up to "
                             f"{n_classes_needed - 1}")
    return [suite for suite in SUITES if suite in suites]


_RUNNERS: dict[str, Callable[[_Run], dict]] = {
    "clean": _run_clean, "noise": _run_noise, "fgsm": _run_fgsm, "pgd": _run_pgd, "linbp": _run_linbp,
    "square": _run_square, "apgd": _run_apgd, "boundary": _run_boundary, "spectral": _run_spectral,
}


def evaluate_runs(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    suites: Sequence[str],
    out_dir: Path,
    seed: int = 0,
    quick: bool = False,
    settings: SuiteSettings | None = None,
) -> dict:
    """Evaluate every model on the same points with each suite; print tables; write JSON and PNG.

    models: name -> model mapping [0, 1] images (N, ...) to logits (N, C). images (N, ...) in
    [0, 1]; labels (N,) class indices. suites: names from SUITES (run in SUITES order, so that
    Square can be compared with the gradient attacks before it). out_dir: gets `<suite>.json`
    and `<suite>.png` for each suite, each written atomically. seed: every random draw (noise,
    random starts, Square, spheres) comes from it. quick: the QUICK settings (seconds on small
    models: the first 256 images, small budgets), else FULL (the papers' budgets, all images).
    settings: a SuiteSettings to use instead of QUICK/FULL (e.g. dataclasses.replace(FULL,
    linbp_first=3)).

    Inputs are validated before anything is written (ValueError: unknown suite, images outside
    [0, 1], shapes; MissingDependency, also a ValueError: ART for square/apgd). Models are put in
    eval mode for the evaluation and each submodule's previous mode is restored afterwards.

    Returns {"suites": {suite: {"suite", "settings", "n_points", "models": {name: numbers},
    "warnings": [...]}}, "warnings": [all warnings], "models": [names], "n_points", "seed",
    "quick"}. Accuracies, errors, drops and success rates are fractions in [0, 1].
    """
    suites = _validate(models, images, labels, suites, out_dir, seed)
    if settings is None:
        settings = QUICK if quick else FULL
    elif not isinstance(settings, SuiteSettings):
        raise ValueError(f"settings must be a SuiteSettings, got {type(settings).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = images.detach()[: settings.max_points], labels.detach()[: settings.max_points]
    run = _Run(dict(models), images, labels, settings, seed)
    results: dict[str, dict] = {}
    all_warnings: list[str] = []

    def save(suite: str) -> None:
        write_json(out_dir / f"{suite}.json", results[suite])

    with contextlib.ExitStack() as stack:
        for model in run.models.values():
            stack.enter_context(eval_mode(model))
        for suite in suites:
            result = _RUNNERS[suite](run)
            result = {"suite": suite, "n_points": run.n, "seed": seed, "quick": quick, **result}
            results[suite] = result
            print("\n".join(_tables(suite, result)))
            _print_warnings(result["warnings"])
            all_warnings += [w for w in result["warnings"] if w not in all_warnings]
            save(suite)
            write_png(out_dir / f"{suite}.png", _plot(suite, result))
        cross = _square_versus_gradient(results, run)
        if cross:
            results["square"]["warnings"] += cross
            save("square")
            _print_warnings(cross)
            all_warnings += [w for w in cross if w not in all_warnings]
    return {
        "suites": results,
        "warnings": all_warnings,
        "models": list(run.models),
        "n_points": run.n,
        "seed": seed,
        "quick": quick,
    }


def _print_warnings(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"WARNING (possible false robustness): {warning}")
    print()
