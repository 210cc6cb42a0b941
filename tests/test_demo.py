"""The demo at a tiny size: it trains all three methods and writes a sane table and plot."""
from __future__ import annotations

import json

import pytest

from robustbp import cli, demo, methods

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
    for row in table["rows"]:
        for key in demo.COLUMNS:
            assert 0.0 <= row[key] <= 100.0
            assert row[key] * 40 / 100 == pytest.approx(round(row[key] * 40 / 100))  # a count of 40 images
        assert row["method"] in out
    png = (tmp_path / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    for method, _ in demo.METHODS:
        assert (tmp_path / method / "model.pt").is_file()
    # Running it again replaces the runs instead of refusing.
    assert cli.main(["demo", "--out", str(tmp_path), "--epochs", "1", "--train-size", "100",
                     "--test-size", "40", "--quiet"]) == 0
