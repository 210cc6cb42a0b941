"""The spectral suite: power-iteration error of the Jacobian spectral norm, the bound, the cost (spectral paper Fig. 5)."""
from __future__ import annotations

from robustbp.evaluate.report import format_table, new_figure
from robustbp.evaluate.spectral import spectral_error_curve, spectral_timing
from robustbp.evaluate.suites.base import Evaluation, Setting, Suite

SETTINGS = {
    "spectral_points": Setting(full=256, quick=16),
    "spectral_iters": Setting(full=(1, 2, 3, 5, 10, 20), quick=(1, 2, 5)),
    "spectral_batch_sizes": Setting(full=(1, 8, 32, 128), quick=(1, 4)),
    "spectral_repeats": Setting(full=3, quick=1),
}


def run(evaluation: Evaluation) -> dict:
    from robustbp.passes import NotLinearizable, UnsupportedModule

    s = evaluation.settings
    x_error = evaluation.x[: s.spectral_points]
    batch_sizes = [b for b in s.spectral_batch_sizes if b <= evaluation.n] or [evaluation.n]
    models = {}
    for name, model in evaluation.models.items():
        try:
            models[name] = {
                "error": spectral_error_curve(model, x_error, s.spectral_iters, evaluation.seed),
                "timing": spectral_timing(model, evaluation.x, batch_sizes, 1, s.spectral_repeats, evaluation.seed),
            }
        except (NotLinearizable, UnsupportedModule) as error:
            models[name] = {"unavailable": f"{type(error).__name__}: {error}"}
    settings = {"points": int(x_error.shape[0]), "n_iter": list(s.spectral_iters), "batch_sizes": batch_sizes,
                "timing_n_iter": 1, "repeats": s.spectral_repeats, "conv_norm": "reshaped kernel"}
    warnings = [f"{name}: spectral suite skipped ({m['unavailable']})" for name, m in models.items()
                if "unavailable" in m]
    return {"settings": settings, "models": models, "warnings": warnings}


def tables(result: dict) -> list[str]:
    error_rows, time_rows = [], []
    for name, m in result["models"].items():
        if "unavailable" in m:
            error_rows.append([name, "-", m["unavailable"], "", ""])
            continue
        e, t = m["error"], m["timing"]
        error_rows += [[name, k, f"{mean:.3g}", f"{median:.3g}", f"{e['bound_rel_error_mean']:.3g}"]
                       for k, mean, median in zip(e["n_iter"], e["estimate_rel_error_mean"],
                                                  e["estimate_rel_error_median"])]
        time_rows += [[name, b, f"{f:.2e}", f"{es:.2e}", f"{bo:.2e}", f"{ex:.2e}"]
                      for b, f, es, bo, ex in zip(t["batch_size"], t["forward_s"], t["estimate_s"], t["bound_s"],
                                                  t["exact_s"])]
    return [
        format_table("spectral: relative error |s - s_exact| / s_exact of the Jacobian spectral norm",
                     ["model", "power iterations", "estimate mean", "estimate median", "bound mean"], error_rows),
        format_table("spectral: seconds per batch",
                     ["model", "batch", "forward", "estimate (1 it.)", "bound", "exact"], time_rows),
    ]


def plot(result: dict):
    figure, (ax_error, ax_time) = new_figure(2)
    for name, m in result["models"].items():
        if "unavailable" in m:
            continue
        e, t = m["error"], m["timing"]
        line, = ax_error.plot(e["n_iter"], e["estimate_rel_error_mean"], marker="o", label=f"{name} estimate")
        ax_error.axhline(e["bound_rel_error_mean"], linestyle="--", color=line.get_color(), label=f"{name} bound")
        for key, marker in (("estimate_s", "o"), ("bound_s", "^"), ("exact_s", "s")):
            ax_time.plot(t["batch_size"], t[key], marker=marker, label=f"{name} {key[:-2]}")
    ax_error.set(xlabel="power iterations", ylabel="mean relative error", ylim=(0, None),
                 title="spectral norm: estimate vs bound")
    batch_sizes = result["settings"]["batch_sizes"]
    ax_time.set(xlabel="batch size", ylabel="seconds per batch", xscale="log", yscale="log", title="cost")
    ax_time.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax_time.minorticks_off()
    ax_error.legend(fontsize="small")
    ax_time.legend(fontsize="small")
    return figure


SUITE = Suite("spectral", "power-iteration error of the Jacobian spectral norm by iterations, the bound, time per batch",
              SETTINGS, run, tables, plot)
