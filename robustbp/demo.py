"""The demo: three ways to train the IBP paper's MNIST net, and how robust each one is.

    robustbp demo --out runs/demo          # or: make demo  (45 s on 2 idle CPU cores)

Trains `ibp-mnist` on the embedded `mnist-5k` (4,000 training digits) with
  standard               plain backpropagation,
  loss-ibp               Invariant BP with the IBP paper's Table 3 MNIST setting IBP-L1: p = 1, β = 0.03,
  adversarial-backprop   Nøkland's adversarial back-propagation, ε = 0.08,
then prints (in percent) and saves (as fractions, 1 - `robustbp.evaluate.accuracy`), for each, the
test error on the 1,000 test digits: clean, under Gaussian noise (σ = 0.3, clipped to [0, 1]) and
under the fast gradient sign perturbation (ε = 0.1, computed against each model itself). Files
under the output folder:
  <method>/       each run folder (config.json, history.json, checkpoint.pt, model.pt)
  demo.json       the table and every setting;   demo.png   the table as a bar chart.

The runs are short (a few epochs instead of the papers' hundreds) so the whole demo fits in a
few minutes; the training settings below differ from TrainConfig's defaults for that reason.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from robustbp.attacks import fgsm
from robustbp.evaluate import accuracy, gaussian_noise
from robustbp.evaluate.report import format_table, new_figure, percent, write_json, write_png
from robustbp.modes import eval_mode
from robustbp.training import TrainConfig, train

DATASET, MODEL = "mnist-5k", "ibp-mnist"
METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("standard", {}),
    ("loss-ibp", {"beta": 0.03, "p": 1}),            # IBP paper Table 3, MNIST, IBP-L1
    ("adversarial-backprop", {"eps": 0.08}),         # Nøkland, Table 2
)
EPOCHS = 4
NOISE_SIGMA = 0.3
FGSM_EPS = 0.1
# What differs from TrainConfig's defaults (the IBP paper's 400-epoch setting), and why:
DEMO_SETTINGS = dict(
    batch_size=64,        # more steps in a short run
    lr=0.02,              # stable for all three methods with momentum 0.9 at batch 64
    schedule="exp:0.8",   # settles within a few epochs
)
COLUMNS = {  # the fraction of the test images misclassified
    "test_error": "clean test images",
    "noise_error": f"Gaussian noise σ={NOISE_SIGMA}",
    "fgsm_error": f"FGSM ε={FGSM_EPS}",
}


def demo_config(method: str, params: dict[str, Any], epochs: int = EPOCHS, train_size: int | None = None,
                seed: int = 0, device: str = "cpu") -> TrainConfig:
    return TrainConfig(dataset=DATASET, model=MODEL, method=method, method_params=dict(params), epochs=epochs,
                       train_size=train_size, seed=seed, device=device, **DEMO_SETTINGS)


def robustness(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, float]:
    """Test error (a fraction, 1 - accuracy) clean, under Gaussian noise and under FGSM, in eval mode."""
    noisy = gaussian_noise(images, NOISE_SIGMA, torch.Generator().manual_seed(seed))  # the same noise for every model
    with eval_mode(model):
        adversarial = fgsm(model, images, labels, FGSM_EPS)
    return {
        "test_error": 1 - accuracy(model, images, labels),
        "noise_error": 1 - accuracy(model, noisy, labels),
        "fgsm_error": 1 - accuracy(model, adversarial, labels),
    }


def run(out_dir: str | Path = "runs/demo", epochs: int = EPOCHS, train_size: int | None = None,
        test_size: int | None = None, seed: int = 0, progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Train the three methods on `device` (cpu, cuda, cuda:K or auto), evaluate them there, print
    the table; write demo.json and demo.png."""
    from robustbp import data
    from robustbp.training import check_device

    if test_size is not None and test_size < 1:
        raise ValueError(f"test_size must be a whole number >= 1, got {test_size}")
    where = check_device(device)
    configs = [demo_config(method, params, epochs, train_size, seed, str(where)) for method, params in METHODS]  # checks first
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, test = data.load(DATASET)
    images, labels = test.images[:test_size].to(where), test.labels[:test_size].to(where)
    rows = []
    for config in configs:
        method, params = config.method, config.method_params
        started = time.perf_counter()
        result = train(config, out / method, overwrite=True, progress=progress)
        if result.status != "complete":
            raise KeyboardInterrupt
        seconds = time.perf_counter() - started
        rows.append({"method": method, "params": params, **robustness(result.model, images, labels, seed),
                     "train_seconds": round(seconds, 1)})
    table = {
        "dataset": DATASET, "model": MODEL, "test_images": len(labels), "epochs": epochs,
        "train_size": train_size, "seed": seed, "noise_sigma": NOISE_SIGMA, "fgsm_eps": FGSM_EPS,
        "settings": DEMO_SETTINGS, "columns": COLUMNS, "rows": rows,
    }
    title = f"{MODEL} on {DATASET}, {epochs} epochs, {len(labels)} test images"
    table_path, plot_path = out / "demo.json", out / "demo.png"
    write_json(table_path, table)
    write_png(plot_path, plot(rows, title))
    print(demo_table(rows, title))
    return {**table, "table_path": str(table_path), "plot_path": str(plot_path)}


def demo_table(rows: list[dict[str, Any]], title: str) -> str:
    """The printed table: test errors in percent, training seconds."""
    heads = ["method", "test error %", f"noise σ={NOISE_SIGMA} %", f"FGSM ε={FGSM_EPS} %", "train s"]
    cells = [[r["method"] + (f" ({', '.join(f'{k}={v}' for k, v in r['params'].items())})" if r["params"] else ""),
              *(percent(r[key]) for key in COLUMNS), f"{r['train_seconds']:.1f}"] for r in rows]
    return format_table(title, heads, cells)


def plot(rows: list[dict[str, Any]], title: str = ""):
    """Grouped bars of the errors in percent: one group per method, one bar per condition."""
    figure, (axes,) = new_figure(1, width_per_panel=7, height=4)
    width = 0.8 / len(COLUMNS)
    for k, (key, label) in enumerate(COLUMNS.items()):
        positions = [i + (k - (len(COLUMNS) - 1) / 2) * width for i in range(len(rows))]
        bars = axes.bar(positions, [100 * r[key] for r in rows], width, label=label)
        axes.bar_label(bars, fmt="%.1f", fontsize=8)
    axes.set_xticks(range(len(rows)), [r["method"] for r in rows])
    axes.set_ylabel("error (%)")
    axes.set_ylim(0, min(100.0, 130 * max(max(r[key] for key in COLUMNS) for r in rows) + 1.0))
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="upper right")
    return figure
