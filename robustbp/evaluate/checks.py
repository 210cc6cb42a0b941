"""Warnings against false robustness, printed with the results (after auto-attack's `checks.py`).

A model can look robust because the attacks failed, not because it is. Three signs:

1. **The attack success rate (ASR) does not rise with more steps or a larger ε.** A stronger
   attack of the same kind must succeed at least as often: if the ASR *falls* as the budget
   grows (by more than the tolerance), the attack is unreliable. On curves that span a wide
   range of strength — FGSM from ε = 0 to 32/255, PGD/TPGD from 1 step (one step of 2/255) to
   20 (reaching 32/255), Square over at least two orders of magnitude of queries (10 to 1000;
   not quick mode's 20 to 100) — the ASR must also *rise*: staying
   flat below 100 % there suggests uninformative gradients (masked, shattered, saturated).
   The LinBP and APGD tables (ε 8/255 and 16/255, 10 to 100 steps) get only the "falls" check,
   since a model can be truly robust at those budgets (MNIST models often are).
   (The unnormalized step x + ε·∇ₓL is not checked: its reach depends on the gradient's size.)
2. **The gradient-free Square attack beats the gradient attacks** at the same ε and norm. A
   random search should not outdo the gradient when the gradient is honest.
3. **Input gradients are zero or non-finite on a large share of points** (≥ 10 % by default):
   gradient attacks cannot move those points at all.

Tolerance: a difference counts only when larger than max(2 points, 2 samples' worth), so that
sampling noise on small test sets does not raise false alarms. ASRs are fractions in [0, 1].
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

ZERO_GRADIENT_SHARE = 0.10


def tolerance(n_points: int) -> float:
    """max(0.02, 2/n): two percentage points, or two points of a small test set."""
    return max(0.02, 2.0 / max(n_points, 1))


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def budget_warnings(
    model: str,
    attack: str,
    budget_name: str,
    budgets: Sequence[float],
    success: Sequence[float],
    n_points: int,
    check_flat: bool = True,
) -> list[str]:
    """Check 1 for one curve: ASR against an increasing budget (steps, queries or ε); the
    "does not rise" part only when check_flat (for curves spanning a wide range of strength)."""
    points = [(b, s) for b, s in zip(budgets, success) if s is not None and not math.isnan(s)]
    if len(points) < 2:
        return []
    tol = tolerance(n_points)
    warnings = []
    best_budget, best = points[0]
    for budget, rate in points[1:]:
        if rate < best - tol:
            warnings.append(
                f"{model}: {attack} success rate falls from {_percent(best)} at {budget_name} {best_budget:g} "
                f"to {_percent(rate)} at {budget_name} {budget:g}; a larger budget should not weaken an attack "
                "(unreliable gradients or a noisy attack)"
            )
            break
        if rate > best:
            best_budget, best = budget, rate
    (first_budget, first_rate), (last_budget, last_rate) = points[0], points[-1]
    if check_flat and last_rate - first_rate <= tol and last_rate < 1.0 - tol:
        warnings.append(
            f"{model}: {attack} success rate does not rise with {budget_name} ({_percent(first_rate)} at "
            f"{first_budget:g}, {_percent(last_rate)} at {last_budget:g}) while below 100%; the attack may be "
            "blind (masked gradients, flat outputs) - confirm the robustness with other attacks"
        )
    return warnings


def square_warnings(
    model: str, eps: float, norm: str, square_success: float, gradient_success: Mapping[str, float], n_points: int
) -> list[str]:
    """Check 2: Square's ASR against the best gradient attack's ASR at the same ε and norm."""
    rates = {name: rate for name, rate in gradient_success.items() if rate is not None and not math.isnan(rate)}
    if not rates or square_success is None or math.isnan(square_success):
        return []
    best_name = max(rates, key=rates.get)
    if square_success > rates[best_name] + tolerance(n_points):
        return [
            f"{model}: the gradient-free Square attack ({_percent(square_success)}) beats the best gradient attack "
            f"{best_name} ({_percent(rates[best_name])}) at {norm} eps={eps:.4g}; the gradients may be masked"
        ]
    return []


def gradient_warnings(model: str, health: Mapping[str, float], threshold: float = ZERO_GRADIENT_SHARE) -> list[str]:
    """Check 3: share of points whose input gradient is all zero or has a non-finite entry."""
    warnings = []
    if health["zero_share"] >= threshold:
        warnings.append(
            f"{model}: the input gradient is exactly zero on {_percent(health['zero_share'])} of the points; "
            "gradient attacks cannot move them (masked or saturated gradients)"
        )
    if health["nonfinite_share"] >= threshold:
        warnings.append(
            f"{model}: the input gradient is nan or inf on {_percent(health['nonfinite_share'])} of the points; "
            "gradient attacks are unreliable there"
        )
    return warnings
