"""Accuracy and cost of spectral-norm estimates of the input-logit Jacobian (spectral paper §4.3, Fig. 5).

Three ways to get σ_max(J(x)), J(x) = ∂f(x)/∂x ∈ R^{C×d} for one sample:
  exact     the full per-sample Jacobian by torch.func.jacrev (vmapped over the batch), then
            torch.linalg.matrix_norm(J, ord=2) (App. A.3: "the analytical method");
  estimate  power iteration through the linearized network, `robustbp.power_iteration.spectral_norm_estimate`
            (Alg. 1): v ~ N(0, I)/‖·‖; n_iter times u = Jv/‖Jv‖, v = Jᵀu; σ̂ = ‖Jᵀu‖ ≤ σ_max;
  bound     ∏_l ‖W_l‖₂ over the model's linear layers (Yoshida & Miyato 2017; the paper's
            Spectral-Bound), see `spectral_norm_bound`.
Relative error = |σ̃ - σ_max| / σ_max per sample.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from robustbp.power_iteration import spectral_norm_estimate

from robustbp.validation import check_images, check_positive_int
from robustbp.layers import Normalize


def jacobian_spectral_norm(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Exact σ_max of each sample's logit Jacobian, shape (B,): vmap(jacrev(f)) then matrix_norm(ord=2).

    The model is used as given (in eval mode, samples do not interact through batch statistics).
    """
    check_images(x, "x")

    def logits_of_one(sample: torch.Tensor) -> torch.Tensor:
        return model(sample.unsqueeze(0)).squeeze(0)

    x = x.detach()
    with torch.enable_grad():
        try:
            jacobians = torch.func.vmap(torch.func.jacrev(logits_of_one))(x)
        except RuntimeError:  # a module vmap cannot batch: one jacrev per sample
            jacobians = torch.stack([torch.func.jacrev(logits_of_one)(sample) for sample in x])
    return torch.linalg.matrix_norm(jacobians.flatten(2).detach(), ord=2)


def layer_spectral_norms(model: nn.Module) -> list[tuple[str, float]]:
    """(name, ‖layer‖₂) for each linear layer of the model, in module order.

    Linear: σ_max(W). Conv1d/2d/3d: σ_max of the kernel reshaped to (out, in·k…) — the
    reshaped-kernel norm of Yoshida & Miyato (2017), *not* the conv's exact operator norm (which
    can be larger, by at most √(kernel area) for stride 1). Normalize: max 1/std. BatchNorm (eval,
    running statistics): max |γ|/√(running_var + ε). Other layers (ReLU, tanh, pooling, flatten,
    dropout) are taken as norm ≤ 1 and left out; max-pooling with overlapping windows can exceed 1.
    """
    norms = []
    for name, module in model.named_modules():
        with torch.no_grad():
            if isinstance(module, nn.Linear):
                norms.append((name, float(torch.linalg.matrix_norm(module.weight, ord=2))))
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                kernel = module.weight.reshape(module.weight.shape[0], -1)
                norms.append((name, float(torch.linalg.matrix_norm(kernel, ord=2))))
            elif isinstance(module, Normalize):
                norms.append((name, float((1.0 / module.std).abs().max())))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                gamma = module.weight if module.weight is not None else torch.ones_like(module.running_var)
                norms.append((name, float((gamma.abs() / torch.sqrt(module.running_var + module.eps)).max())))
    return norms


def spectral_norm_bound(model: nn.Module) -> float:
    """∏_l ‖W_l‖₂ over `layer_spectral_norms(model)` (each by an exact SVD of the weight)."""
    product = 1.0
    for _, norm in layer_spectral_norms(model):
        product *= norm
    return product


def _estimate(model: nn.Module, x: torch.Tensor, n_iter: int, generator: torch.Generator | None) -> torch.Tensor:
    return spectral_norm_estimate(model, x, n_iter, generator=generator)


def spectral_error_curve(model: nn.Module, x: torch.Tensor, n_iters: Sequence[int], seed: int = 0) -> dict:
    """Relative error of the power-iteration estimate for each number of iterations, and of the bound.

    Every n_iter starts from the same v (a generator seeded with `seed`). Returns
    {"n_iter", "estimate_rel_error_mean", "estimate_rel_error_median", "estimate_rel_error_max"}
    (lists over n_iter), "bound_rel_error_mean", "bound_rel_error_median", "bound" and
    "exact_mean", "exact_median" (σ_max over the points), "n".
    """
    check_images(x, "x")
    n_iters = [check_positive_int(k, "n_iter") for k in n_iters]
    exact = jacobian_spectral_norm(model, x)
    bound = spectral_norm_bound(model)
    means, medians, maxima = [], [], []
    for n_iter in n_iters:
        estimate = _estimate(model, x, n_iter, torch.Generator(device=x.device).manual_seed(seed))
        relative = (estimate - exact).abs() / exact
        means.append(float(relative.mean()))
        medians.append(float(relative.median()))
        maxima.append(float(relative.max()))
    bound_relative = (bound - exact).abs() / exact
    return {
        "n_iter": n_iters,
        "estimate_rel_error_mean": means,
        "estimate_rel_error_median": medians,
        "estimate_rel_error_max": maxima,
        "bound": bound,
        "bound_rel_error_mean": float(bound_relative.mean()),
        "bound_rel_error_median": float(bound_relative.median()),
        "exact_mean": float(exact.mean()),
        "exact_median": float(exact.median()),
        "n": int(x.shape[0]),
    }


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls, after one untimed warm-up call."""
    run()  # warm-up, not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def spectral_timing(
    model: nn.Module, x: torch.Tensor, batch_sizes: Sequence[int], n_iter: int = 1, repeats: int = 3, seed: int = 0
) -> dict:
    """Seconds per batch (median of `repeats` after one warm-up) for each batch size b ≤ len(x):
    a plain forward pass, the estimate (`n_iter` power iterations), the bound (independent of b:
    one SVD per layer) and the exact Jacobian norm. Returns lists over "batch_size" under
    "forward_s", "estimate_s", "bound_s", "exact_s", and "n_iter", "repeats"."""
    check_images(x, "x")
    batch_sizes = [check_positive_int(b, "batch size") for b in batch_sizes]
    check_positive_int(repeats, "repeats")
    if max(batch_sizes) > x.shape[0]:
        raise ValueError(f"batch sizes go up to {max(batch_sizes)} but only {x.shape[0]} images were given")
    result = {"batch_size": batch_sizes, "forward_s": [], "estimate_s": [], "bound_s": [], "exact_s": []}
    for b in batch_sizes:
        batch = x[:b]

        def forward():
            with torch.no_grad():
                model(batch)

        generator = torch.Generator(device=x.device).manual_seed(seed)
        result["forward_s"].append(median_seconds(forward, repeats))
        result["estimate_s"].append(median_seconds(lambda: _estimate(model, batch, n_iter, generator), repeats))
        result["bound_s"].append(median_seconds(lambda: spectral_norm_bound(model), repeats))
        result["exact_s"].append(median_seconds(lambda: jacobian_spectral_norm(model, batch), repeats))
    result.update({"n_iter": n_iter, "repeats": repeats})
    return result
