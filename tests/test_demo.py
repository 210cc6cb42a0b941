"""The demo at a tiny size: it trains all three methods and writes a sane table and plot."""
from __future__ import annotations

import json

import pytest
import torch

from robustbp import cli, data, demo, methods
from robustbp.attacks import fgsm
from robustbp.evaluate import accuracy, gaussian_noise
from robustbp.modes import eval_mode
from robustbp.training import load_run

from .helpers import one_thread_per_module  # noqa: F401 (autouse fixture)


def test_demo_methods_are_registered_with_the_papers_settings():
    for method, params in demo.METHODS:
        assert set(params) <= set(methods.parameters_of(method))
    assert dict(demo.METHODS)["loss-ibp"] == {"beta": 0.03, "p": 1}  # IBP paper Table 3, MNIST IBP-L1
    assert dict(demo.METHODS)["adversarial-backprop"] == {"eps": 0.08}  # Nøkland


def test_tiny_demo_writes_table_and_plot(tmp_path, capsys):
    code = cli.main(["demo", "--out", str(tmp_path), "--epochs", "1", "--train-size", "100",
                     "--test-size", "40", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    table = json.loads((tmp_path / "demo.json").read_text())
    assert [row["method"] for row in table["rows"]] == [m for m, _ in demo.METHODS]
    assert table["test_images"] == 40 and table["epochs"] == 1
    _, test = data.load(demo.DATASET)
    images, labels = test.images[:40], test.labels[:40]
    noisy = gaussian_noise(images, demo.NOISE_SIGMA, torch.Generator().manual_seed(0))
    for row in table["rows"]:  # errors stored as fractions: 1 - metrics.accuracy, a count of 40 images
        model, _ = load_run(tmp_path / row["method"])
        with eval_mode(model):
            adversarial = fgsm(model, images, labels, demo.FGSM_EPS)
        for key, x in (("test_error", images), ("noise_error", noisy), ("fgsm_error", adversarial)):
            assert row[key] == 1 - accuracy(model, x, labels)
            with torch.no_grad():
                wrong = int((model(x).argmax(1) != labels).sum())
            assert row[key] == pytest.approx(wrong / 40, abs=1e-12)
        assert row["method"] in out and f"{100 * row['test_error']:.1f}" in out  # printed in percent
    png = (tmp_path / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    for method, _ in demo.METHODS:
        assert (tmp_path / method / "model.pt").is_file()
    # Running it again replaces the runs instead of refusing.
    assert cli.main(["demo", "--out", str(tmp_path), "--epochs", "1", "--train-size", "100",
                     "--test-size", "40", "--quiet"]) == 0
