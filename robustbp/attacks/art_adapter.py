"""Adapters to the Adversarial Robustness Toolbox (ART): APGD, Square, AutoAttack and ART's PGD.

ART is the optional extra `robustbp[attacks]` (`pip install robustbp[attacks]`); it is imported
only inside these functions. The model is wrapped in `art.estimators.classification.PyTorchClassifier`
with clip_values=(0, 1), so ART sees the same [0, 1] images and logits as the in-house attacks.

ART switches the model to eval mode and calls `model.zero_grad()` for each gradient; the
functions here restore every submodule's train/eval flag and the parameters' `.grad` afterwards.
ART draws its random numbers from numpy's and Python's global generators: each function seeds
them with `seed` and restores their previous state on exit.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from robustbp.methods.linbp import linbp_backward
from robustbp.modes import preserved_mode, preserved_parameter_grads
from robustbp.validation import (
    MissingDependency,
    check_attack_inputs,
    check_choice,
    check_gradient,
    check_nonnegative,
    check_positive_int,
)

INSTALL_HINT = (
    "this attack needs the Adversarial Robustness Toolbox (ART): install robustbp[attacks], "
    "e.g. pip install 'robustbp[attacks]'"
)


def require_art():
    """Import ART or raise MissingDependency (an ImportError and a ValueError) with the install hint."""
    try:
        import art  # noqa: F401
        from art.estimators.classification import PyTorchClassifier  # noqa: F401
    except ImportError as error:
        raise MissingDependency(f"{INSTALL_HINT} ({error})") from error
    return art


def art_available() -> bool:
    try:
        require_art()
    except ImportError:
        return False
    return True


class _Logits(nn.Module):
    """Plain wrapper so ART calls `model(x)` (ART unrolls an nn.Sequential module by module,
    which would skip hooks on the model itself)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def art_classifier(model: nn.Module, x: torch.Tensor, n_classes: int | None = None):
    """Wrap `model` ([0, 1] images -> logits) as an ART PyTorchClassifier, clip_values=(0, 1)."""
    require_art()
    from art.estimators.classification import PyTorchClassifier

    if n_classes is None:
        with torch.no_grad():
            n_classes = int(model(x[:1]).shape[1])
    device = next((p.device for p in model.parameters()), x.device)
    return PyTorchClassifier(
        model=_Logits(model),
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=n_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


def _use_linbp_gradients(estimator, model: nn.Module, first: int) -> None:
    """Make this estimator's loss gradients LinBP gradients: each call runs its forward and
    backward pass inside `robustbp.methods.linbp.linbp_backward(model, first)`."""
    library_loss_gradient = estimator.loss_gradient

    def loss_gradient(*args, **kwargs):
        with linbp_backward(model, first):
            return library_loss_gradient(*args, **kwargs)

    estimator.loss_gradient = loss_gradient


@contextlib.contextmanager
def _art_run(model: nn.Module, seed: int) -> Iterator[None]:
    """Seed ART's global random generators, and give back the model's mode, `.grad` and the
    generators' previous states on exit."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        with preserved_mode(model), preserved_parameter_grads(model):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _art_norm(norm: str):
    check_choice(norm, "norm", ("linf", "l2"))
    return np.inf if norm == "linf" else 2


def _run(attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x_np = x.detach().cpu().numpy().astype(np.float32)
    y_np = y.detach().cpu().numpy().astype(np.int64)
    x_adv = attack.generate(x=x_np, y=y_np)
    return torch.from_numpy(np.asarray(x_adv, dtype=np.float32)).to(device=x.device, dtype=x.dtype).clamp(0.0, 1.0)


def art_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """ART's ProjectedGradientDescent with the in-house `pgd` settings (for the cross-check).

    restarts=r with random_start maps to num_random_init=r; random_start=False to num_random_init=0.
    """
    eps = check_attack_inputs(x, y, eps)
    step = check_nonnegative(step, "step")
    check_positive_int(steps, "steps")
    check_positive_int(restarts, "restarts")
    require_art()
    from art.attacks.evasion import ProjectedGradientDescent

    with _art_run(model, seed):
        attack = ProjectedGradientDescent(
            art_classifier(model, x),
            norm=_art_norm(norm),
            eps=eps,
            eps_step=step,
            max_iter=steps,
            num_random_init=restarts if random_start else 0,
            batch_size=batch_size,
            verbose=False,
        )
        return _run(attack, x, y)


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 100,
    norm: str = "linf",
    restarts: int = 1,
    loss: str = "ce",
    gradient: str = "bp",
    first: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020) from ART; LinBP paper Table II uses it with 5 restarts.

    loss="ce" (cross-entropy) or "dlr" (difference of logits ratio, needs ≥ 3 classes); the initial
    step size is 2ε as in the paper. gradient="linbp" makes ART's loss gradients LinBP gradients
    from the `first`-th ReLU on. x (B, ...) in [0, 1], y (B,) -> adversarial images (B, ...).
    """
    eps = check_attack_inputs(x, y, eps)
    check_positive_int(steps, "steps")
    check_positive_int(restarts, "restarts")
    check_choice(loss, "loss", ("ce", "dlr"))
    check_gradient(gradient, first)
    require_art()
    from art.attacks.evasion import AutoProjectedGradientDescent

    with _art_run(model, seed):
        attack = AutoProjectedGradientDescent(
            art_classifier(model, x),
            norm=_art_norm(norm),
            eps=eps,
            eps_step=2 * eps,
            max_iter=steps,
            nb_random_init=restarts,
            batch_size=batch_size,
            loss_type="cross_entropy" if loss == "ce" else "difference_logits_ratio",
            verbose=False,
        )
        if gradient == "linbp":
            _use_linbp_gradients(attack.estimator, model, first)
        return _run(attack, x, y)


def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    queries: int = 1000,
    norm: str = "linf",
    p_init: float = 0.8,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Square attack (Andriushchenko et al. 2020) from ART: gradient-free random search.

    `queries` is ART's max_iter (one model query per point and iteration); p_init=0.8 is the
    torchattacks default the spectral paper used. x (B, C, H, W) in [0, 1] -> (B, C, H, W).
    """
    eps = check_attack_inputs(x, y, eps)
    check_positive_int(queries, "queries")
    check_positive_int(restarts, "restarts")
    if x.dim() != 4:
        raise ValueError(f"square needs images of shape (B, C, H, W), got {tuple(x.shape)}")
    require_art()
    from art.attacks.evasion import SquareAttack

    with _art_run(model, seed):
        attack = SquareAttack(
            art_classifier(model, x),
            norm=_art_norm(norm),
            max_iter=queries,
            eps=eps,
            p_init=p_init,
            nb_restarts=restarts,
            batch_size=batch_size,
            verbose=False,
        )
        return _run(attack, x, y)


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 5,
    queries: int = 5000,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """AutoAttack-style ensemble (Croce & Hein 2020) from ART's attacks, run in sequence:
    APGD-CE and APGD-DLR (`steps` steps, `restarts` restarts; DLR only with ≥ 3 classes), then
    Square (`queries` queries; images (B, C, H, W) only). Each attack sees only the points still
    classified correctly; per point the first successful adversarial image is kept.

    Composed here rather than taken from `art.attacks.evasion.AutoAttack`, which imports the
    package `multiprocess` (not an ART dependency) and adds DeepFool. Slow at the defaults:
    meant for final numbers, not for the quick suites.
    """
    eps = check_attack_inputs(x, y, eps)
    check_choice(norm, "norm", ("linf", "l2"))
    check_positive_int(steps, "steps")
    check_positive_int(restarts, "restarts")
    check_positive_int(queries, "queries")
    require_art()
    with torch.no_grad():
        logits = model(x)
    n_classes = logits.shape[1]
    stages = [lambda xs, ys: apgd(model, xs, ys, eps, steps, norm, restarts, "ce", seed=seed, batch_size=batch_size)]
    if n_classes >= 3:
        stages.append(
            lambda xs, ys: apgd(model, xs, ys, eps, steps, norm, restarts, "dlr", seed=seed, batch_size=batch_size)
        )
    if x.dim() == 4:
        stages.append(lambda xs, ys: square(model, xs, ys, eps, queries, norm, seed=seed, batch_size=batch_size))
    x_adv = x.detach().clone()
    robust = logits.argmax(dim=1) == y
    for stage in stages:
        index = torch.nonzero(robust).flatten()
        if len(index) == 0:
            break
        candidate = stage(x[index], y[index])
        with torch.no_grad():
            fooled = model(candidate).argmax(dim=1) != y[index]
        x_adv[index[fooled]] = candidate[fooled]
        robust[index[fooled]] = False
    return x_adv
