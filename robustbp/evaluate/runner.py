"""`evaluate_runs`, the one function `robustbp evaluate` calls: every registered suite asked for, on the same points.

    from robustbp.evaluate import evaluate_runs
    results = evaluate_runs({"bp": model_a, "ibp": model_b}, images, labels,
                            ["clean", "noise", "pgd"], Path("runs/eval"), seed=0, quick=True)

Every model is evaluated on the same points, with the same random draws (noise, random starts,
sampled spheres) for a given seed. For each suite a plain-text table is printed and
`<suite>.json` and `<suite>.png` are written, atomically, under out_dir; warnings against false
robustness (see `robustbp.evaluate.checks`) are printed under the table they concern. The suites
(`robustbp.evaluate.suites.REGISTRY`) and what each one measures: `robustbp evaluate --help`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from robustbp.evaluate.report import write_json, write_png
from robustbp.evaluate.settings import FULL, QUICK, SuiteSettings
from robustbp.evaluate.suites import REGISTRY, SUITES, Evaluation, Suite, get
from robustbp.modes import eval_mode
from robustbp.validation import check_images, check_labels


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
    chosen = _validate(models, images, labels, suites, out_dir, seed)
    if settings is None:
        settings = QUICK if quick else FULL
    elif not isinstance(settings, SuiteSettings):
        raise ValueError(f"settings must be a SuiteSettings, got {type(settings).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = images.detach()[: settings.max_points], labels.detach()[: settings.max_points]
    evaluation = Evaluation(dict(models), images, labels, settings, seed)
    results: dict[str, dict] = {}
    all_warnings: list[str] = []

    def report(suite: Suite, warnings: list[str]) -> None:
        """Print the warnings, keep them, and (re)write the suite's JSON."""
        _print_warnings(warnings)
        all_warnings.extend(w for w in warnings if w not in all_warnings)
        write_json(out_dir / f"{suite.name}.json", results[suite.name])

    with contextlib.ExitStack() as stack:
        for model in evaluation.models.values():
            stack.enter_context(eval_mode(model))
        for suite in chosen:
            result = {"suite": suite.name, "n_points": evaluation.n, "seed": seed, "quick": quick,
                      **suite.run(evaluation)}
            results[suite.name] = result
            print("\n".join(suite.tables(result)))
            report(suite, result["warnings"])
            write_png(out_dir / f"{suite.name}.png", suite.plot(result))
        for suite in chosen:
            if suite.compare is not None:
                others = [(REGISTRY[name], result) for name, result in results.items() if name != suite.name]
                warnings = suite.compare(results[suite.name], others, evaluation)
                if warnings:
                    results[suite.name]["warnings"] += warnings
                    report(suite, warnings)
    return {
        "suites": results,
        "warnings": all_warnings,
        "models": list(evaluation.models),
        "n_points": evaluation.n,
        "seed": seed,
        "quick": quick,
    }


def _validate(models, images, labels, suites, out_dir, seed) -> list[Suite]:
    """The registered suites asked for, in registry order, once every input is checked."""
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict of name -> nn.Module")
    for name, model in models.items():
        if not isinstance(name, str) or not isinstance(model, nn.Module):
            raise ValueError(f"models must map names (str) to nn.Module, got {name!r} -> {type(model).__name__}")
    check_images(images, "images")
    check_labels(labels, images, "labels")
    names = [suites] if isinstance(suites, str) else list(suites)
    if not names:
        raise ValueError(f"no suite given; choose from {', '.join(SUITES)}")
    chosen = [get(name) for name in names]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a folder")
    for suite in chosen:
        suite.check_images(images)
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
    return [suite for suite in REGISTRY.values() if suite.name in names]


def _print_warnings(warnings: Sequence[str]) -> None:
    for warning in warnings:
        print(f"WARNING (possible false robustness): {warning}")
    print()
