"""`robustbp bench` runs on a tiny model and prints a ratio for every method (no timing is asserted)."""
from __future__ import annotations

import json
import re

import torch

import robustbp.methods as methods
from robustbp import bench
from robustbp.bench import DEFAULT_METHODS, parse_method
from robustbp.cli import main


def test_bench_prints_a_ratio_for_every_method(tmp_path, capsys):
    out = tmp_path / "bench.json"
    status = main(["bench", "--model", "mlp-2x256", "--image-size", "8", "--batch-size", "4",
                   "--rounds", "2", "--warmup", "1", "--json", str(out)])
    assert status == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"^(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if match:
            rows[match.group(1)] = float(match.group(3))
    assert set(rows) == set(DEFAULT_METHODS)
    assert rows["standard"] == 1.0
    assert all(ratio > 0 for ratio in rows.values())
    assert {parse_method(spec)[0] for spec in rows} == set(methods.available())
    saved = json.loads(out.read_text())
    timings = {t["method"]: t for t in saved["setups"][0]["timings"]}
    assert list(timings) == list(DEFAULT_METHODS)
    standard_ms = timings["standard"]["median_ms"]
    for t in timings.values():  # each ratio is that method's median over standard's, from the same rounds
        assert t["median_ms"] > 0 and abs(t["ratio"] - t["median_ms"] / standard_ms) <= 1e-9 * t["ratio"]
    # what autograd saves is deterministic: five stacked tangents save more than a plain step, and
    # LinBP's ReLUs (derivative 1) save nothing beyond what the next layer keeps
    assert timings["tangent-prop"]["saved_mib"] > timings["standard"]["saved_mib"] > 0
    assert timings["linbp"]["saved_mib"] <= timings["standard"]["saved_mib"]


def test_bench_rejects_an_unknown_method_option(capsys):
    assert main(["bench", "--model", "mlp-2x256", "--methods", "loss-ibp:q=1", "--rounds", "1"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no parameter 'q'" in error


def test_parse_method():
    assert parse_method("loss-ibp:p=2/beta=0.5/norm=sign") == ("loss-ibp", {"p": 2, "beta": 0.5, "norm": "sign"})
    assert parse_method("standard") == ("standard", {})


def test_bench_interleaves_several_models(tmp_path):
    """`--model a,b` times both models in the same rounds; each ratio is to that model's standard."""
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "lenet,lenet-functional", "--batch-size", "2", "--methods", "loss-ibp",
                 "--rounds", "1", "--warmup", "0", "--json", str(out)]) == 0
    timings = {t["method"]: t["ratio"] for t in json.loads(out.read_text())["setups"][0]["timings"]}
    assert set(timings) == {"lenet: standard", "lenet: loss-ibp", "lenet-functional: standard",
                            "lenet-functional: loss-ibp"}
    assert timings["lenet: standard"] == timings["lenet-functional: standard"] == 1.0


def test_saved_memory_counts_a_tensor_at_a_reused_address():
    """Two 1,000-float tensors saved one after the other, the first freed before the second is
    made (so the allocator may hand out its address again): 8,000 bytes, not 4,000."""

    def two_steps():
        for _ in range(2):
            x = torch.randn(1000, requires_grad=True)
            (x * x).sum().backward()

    assert bench.saved_tensor_mib(two_steps) * 2**20 == 2 * 1000 * 4
