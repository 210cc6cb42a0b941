"""`Suite` and `Setting`, the `Evaluation` every suite reads, and the helpers several suites share."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robustbp.attacks.art_adapter import require_art
from robustbp.attacks.gradient_attacks import pgd_checkpoints
from robustbp.attacks.gradients import gradient_health
from robustbp.evaluate import checks
from robustbp.evaluate.metrics import BATCH_SIZE, accuracy, attack_success_rate
from robustbp.methods.linbp import relu_calls

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_AS_FULL = object()


@dataclass(frozen=True)
class Setting:
    """One budget: its value in full mode (the papers') and in quick mode (seconds on small models)."""

    full: Any
    quick: Any = _AS_FULL  # by default the full value
    none_means_all: bool = False  # a count that `--set NAME=none` lifts

    def value(self, quick: bool) -> Any:
        return self.quick if quick and self.quick is not _AS_FULL else self.full


def _accepts_any_images(images: torch.Tensor) -> None:
    return None


def needs_art(images: torch.Tensor) -> None:
    """`Suite.check_images` of a suite that runs the attack library: MissingDependency without it."""
    require_art()


@dataclass(frozen=True)
class Suite:
    """What `robustbp evaluate --suite NAME` runs, prints and plots; `<name>.json` holds `run`'s result.

    run(evaluation) returns {"settings": ..., "models": {model name: numbers}, "warnings": [...]};
    tables and plot take that result (with "suite", "n_points", "seed", "quick" added).
    """

    name: str
    description: str  # one line, for `robustbp evaluate --help`
    settings: dict[str, Setting]  # by the name `--set` takes, e.g. "pgd_steps"
    run: Callable[[Evaluation], dict]
    tables: Callable[[dict], list[str]]
    plot: Callable[[dict], Figure]
    check_images: Callable[[torch.Tensor], None] = _accepts_any_images  # refuse before anything is written
    # success rates {attack label: rate} at an L∞ ε for one model, for the Square comparison
    linf_success_rates: Callable[[dict, str, float], dict[str, float]] | None = None
    # warnings from comparing this suite's result with the other suites' (Suite, result) pairs
    compare: Callable[[dict, list[tuple[Suite, dict]], Evaluation], list[str]] | None = None


@dataclass
class Evaluation:
    """What every suite of one evaluation shares: models, points, settings, seed, a gradient-health cache."""

    models: dict[str, nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    settings: Any  # a SuiteSettings
    seed: int
    health: dict = dataclasses.field(default_factory=dict)
    health_warned: set = dataclasses.field(default_factory=set)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    def generator(self) -> torch.Generator:
        """A fresh generator seeded with the seed: each model and setting gets the same draws."""
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


def adversarial_rows(model: nn.Module, x: torch.Tensor, x_adv_list: list[torch.Tensor], y: torch.Tensor,
                     clean: float) -> dict:
    """Accuracy, drop from the clean accuracy and attack success rate for each adversarial version of x."""
    accuracies = [accuracy(model, x_adv, y) for x_adv in x_adv_list]
    return {
        "accuracy": accuracies,
        "drop": [clean - a for a in accuracies],
        "attack_success_rate": [attack_success_rate(model, x, x_adv, y) for x_adv in x_adv_list],
    }


def batched_pgd(model: nn.Module, evaluation: Evaluation, eps: float, step: float, steps: list[int], norm: str,
                restarts: int, loss: str, gradient: str, first: int) -> list[torch.Tensor]:
    """pgd_checkpoints over batches, one generator for the whole pass; one adversarial x per entry of steps."""
    generator = evaluation.generator()
    x, y = evaluation.x, evaluation.y
    per_batch = [
        pgd_checkpoints(model, x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE], eps, step, steps, norm, restarts, loss,
                        gradient, first, generator)
        for i in range(0, evaluation.n, BATCH_SIZE)
    ]
    return [torch.cat([batch[k] for batch in per_batch]) for k in range(len(steps))]


def bp_and_linbp_entry(evaluation: Evaluation, name: str, warnings: list[str]) -> tuple[dict, tuple[str, ...]]:
    """A model's entry so far ({"gradient_health", "has_relu"}) and the gradients to attack with:
    ("bp", "linbp"), or ("bp",) with a warning for a model that applies no ReLU (LinBP would be BP)."""
    health, health_warnings = evaluation.gradient_health(name)
    warnings += health_warnings
    has_relu = relu_calls(evaluation.models[name], evaluation.x[:1]) > 0
    if not has_relu:
        warnings.append(f"{name}: the model applies no ReLU, so LinBP would be plain BP; only BP is reported")
    return {"gradient_health": health, "has_relu": has_relu}, ("bp", "linbp") if has_relu else ("bp",)


def bp_linbp_lines(axis, x: list, rates_of: Callable[[dict, str], list[float]], models: dict) -> None:
    """One solid BP line and one dashed LinBP line (same colour) per model, success rates in percent."""
    for name, numbers in models.items():
        line, = axis.plot(x, [100 * r for r in rates_of(numbers, "bp")], marker="o", label=f"{name} BP")
        if "linbp" in numbers:
            axis.plot(x, [100 * r for r in rates_of(numbers, "linbp")], marker="s", linestyle="--",
                      color=line.get_color(), label=f"{name} LinBP")


def same_eps(a: float, b: float) -> bool:
    """Two budgets ε that name the same attack strength (equal up to rounding)."""
    return abs(a - b) < 1e-9
