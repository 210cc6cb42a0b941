"""A study's report from hand-made runs in the runner's record format: the numbers in the markdown
are the hand-computed ones, and the files are written."""
from __future__ import annotations

import math
import statistics
import sys
import types
from math import comb

import pytest

from robustbp.studies import definition
from robustbp.studies.report import report_markdown, write_report

BASE, IBP = "double-backprop p=1", "loss-ibp p=1"
SIGMAS = [0.0, 0.1, 0.3]
FGSM_EPS = [0.0, 8 / 255, 32 / 255]


@pytest.fixture(scope="module")
def study():
    return definition.load("ibp-vs-exact")


def history(test_error: float, losses=(2.0, 1.0)) -> list[dict]:
    return [{"epoch": i + 1, "lr": 0.1, "loss": loss, "main_loss": loss, "penalty": 0.0, "train_error": 50.0,
             "val_error": None, "val_loss": None, "test_error": test_error, "seconds": 1.0, "eval_seconds": 0.1}
            for i, loss in enumerate(losses)]


def final_run(budget: str, label: str, seed: int, *, accuracy: float | None, seconds: float, noise_error=None,
              fgsm_success=None, history_error: float = 99.0, params=None) -> dict:
    suites = {}
    if accuracy is not None:
        suites["clean"] = {"accuracy": accuracy, "error": 1 - accuracy, "n_correct": 0, "n": 1000}
    if noise_error is not None:
        suites["noise"] = {"sigma": SIGMAS, "accuracy": [1 - e for e in noise_error], "error": noise_error,
                           "drop": [e - noise_error[0] for e in noise_error], "clean_accuracy": 1 - noise_error[0]}
    if fgsm_success is not None:
        curve = {"eps": FGSM_EPS, "accuracy": [0.5] * 3, "error": [0.5] * 3, "drop": [0.0] * 3,
                 "attack_success_rate": fgsm_success}
        suites["fgsm"] = {"sign": curve, "gradient": {**curve, "eps": [0.0, 1.0, 10.0]}, "gradient_health": {}}
    params = params or {"p": 1, "beta": 0.01}
    return {"key": f"{budget}/final/{label}/seed={seed}", "study": "ibp-vs-exact", "status": "finished",
            "config": {"budget": budget, "phase": "final", "label": label, "method": label.split()[0],
                       "params": params, "train": {}},
            "seed": seed, "history": history(history_error), "results": {"n_points": 1000, "suites": suites},
            "seconds_per_epoch": seconds, "error": None, "robustbp_version": "0.1.0", "torch_version": "2.9.0",
            "host": f"host-{seed % 2}", "recorded_at": float(seed)}


def select_run(budget: str, label: str, beta: float, val_error: float, *, error: str | None = None) -> dict:
    record = history(50.0)
    record[-1]["val_error"] = val_error
    return {"key": f"{budget}/select/{label}/beta={beta}", "study": "ibp-vs-exact",
            "status": "failed" if error else "finished",
            "config": {"budget": budget, "phase": "select", "label": label, "method": label.split()[0],
                       "params": {"p": 1, "beta": beta}, "train": {}},
            "seed": 0, "history": None if error else record, "results": None, "seconds_per_epoch": None,
            "error": error, "robustbp_version": "0.1.0", "torch_version": "2.9.0", "host": "host-0",
            "recorded_at": 0.0}


# cpu budget: 5 seeds; every loss-ibp error below every baseline error (complete separation)
BASE_ACCURACY = [0.80, 0.81, 0.79, 0.82, 0.78]  # test error 20, 19, 21, 18, 22 %
IBP_ACCURACY = [0.90, 0.89, 0.91, 0.88, 0.92]  # test error 10, 11, 9, 12, 8 %
BASE_SECONDS = [4.0, 4.2, 3.8, 4.0, 4.0]
IBP_SECONDS = [3.0, 3.1, 2.9, 3.0, 3.0]
BASE_NOISE = [0.40, 0.42, 0.38, 0.41, 0.39]  # error at σ = 0.3
IBP_NOISE = [0.40, 0.45, 0.35, 0.41, 0.39]


def cpu_runs() -> list[dict]:
    runs = [select_run("cpu", BASE, 0.003, 30.0), select_run("cpu", BASE, 0.01, 25.0),
            select_run("cpu", IBP, 0.003, 28.0),
            select_run("cpu", IBP, 0.01, math.nan, error="NonFiniteLoss: loss is nan at epoch 3, step 17")]
    for seed in range(5):
        runs.append(final_run("cpu", BASE, seed, accuracy=BASE_ACCURACY[seed], seconds=BASE_SECONDS[seed],
                              noise_error=[0.2, 0.3, BASE_NOISE[seed]], fgsm_success=[0.0, 0.5, 0.9]))
        runs.append(final_run("cpu", IBP, seed, accuracy=IBP_ACCURACY[seed], seconds=IBP_SECONDS[seed],
                              noise_error=[0.1, 0.2, IBP_NOISE[seed]], fgsm_success=[0.0, 0.4, 0.8],
                              params={"p": 1, "beta": 0.003}))
    runs.append(final_run("smoke", BASE, 0, accuracy=0.0, seconds=100.0))  # another budget: not read
    return runs


# as runner.chosen_params gives it: full parameters (fixed and grid), a failed candidate scores inf
CHOSEN = {BASE: {"params": {"p": 1, "beta": 0.01}, "by": "val_error", "score": 25.0,
                 "candidates": [({"p": 1, "beta": 0.003}, 30.0), ({"p": 1, "beta": 0.01}, 25.0)]},
          IBP: {"params": {"p": 1, "beta": 0.003}, "by": "val_error", "score": 28.0,
                "candidates": [({"p": 1, "beta": 0.003}, 28.0), ({"p": 1, "beta": 0.01}, math.inf)]}}


def mean_sd(values, digits=2) -> str:
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def row_of(markdown: str, label: str, section: str = "## Results") -> list[str]:
    """The cells of the first table row starting with `label` after the heading `section`."""
    lines = markdown[markdown.index(f"\n{section}\n"):].splitlines()
    line = next(line for line in lines if line.startswith(f"| {label}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture
def stand_in_runner(monkeypatch):
    """robustbp.studies.runner.chosen_params, as the runner will give it (its arguments are kept)."""
    calls = []

    def chosen_params(study, budget, runs):
        calls.append((study.name, budget, len(runs)))
        return CHOSEN

    monkeypatch.setitem(sys.modules, "robustbp.studies.runner", types.SimpleNamespace(chosen_params=chosen_params))
    return calls


def test_report_numbers_are_the_hand_computed_ones(study, stand_in_runner):
    markdown = report_markdown(study, "cpu", cpu_runs())
    assert stand_in_runner == [("ibp-vs-exact", "cpu", 14)]  # only the cpu budget's runs are passed
    base_errors = [100 * (1 - a) for a in BASE_ACCURACY]
    ibp_errors = [100 * (1 - a) for a in IBP_ACCURACY]
    assert markdown.startswith(f"# {study.title}\n")
    assert study.source in markdown and "budget: **cpu**" in markdown
    assert study.deviations[0] in markdown

    header = row_of(markdown, "method")
    base, ibp = row_of(markdown, BASE), row_of(markdown, IBP)
    assert base[0] == f"{BASE} (baseline)"
    assert markdown.index(f"| {BASE}") < markdown.index(f"| {IBP}")  # the baseline first
    column = {name: i for i, name in enumerate(header)}
    assert base[column["test error %"]] == mean_sd(base_errors) == "20.00 ± 1.58"
    assert ibp[column["test error %"]] == mean_sd(ibp_errors) == "10.00 ± 1.58"
    assert base[column["seeds"]] == ibp[column["seeds"]] == "5"
    assert ibp[column["noise error % (σ=0.3)"]] == mean_sd([100 * e for e in IBP_NOISE])
    assert ibp[column["FGSM success % (ε=32/255)"]] == "80.00 ± 0.00"
    assert base[column["s/epoch"]] == mean_sd(BASE_SECONDS, 3)
    assert ibp[column["× baseline"]] == f"{statistics.fmean(IBP_SECONDS) / statistics.fmean(BASE_SECONDS):.2f}×"
    assert ibp[column["× baseline"]] == "0.75×" and base[column["× baseline"]] == "1.00×"
    p_value = 2 / comb(10, 5)  # complete separation, 5 against 5
    assert ibp[column["p (test error)"]] == f"{p_value:.4g}" == "0.007937"
    assert ibp[-1] == "★" and base[-1] == ""
    assert "No correction for multiple comparisons is applied" in markdown

    # the sentences: test error decided, noise not significant
    assert (f"{IBP} is lower than {BASE} in test error % by 10.00 points (50.0% relative) (10.00 ± 1.58 against 20.00 ± 1.58, "
            f"n = 5 against 5, p = 0.007937): significant.") in markdown
    noise = next(line for line in markdown.splitlines() if "in noise error %" in line)
    assert noise.startswith(f"- {IBP} is level with {BASE} in noise error % (σ=0.3) "
                            "(40.00 ± 3.61 against 40.00 ± 1.58")
    assert noise.endswith("p = 1): not significant — cannot be decided at this budget.")
    assert "in s/epoch by 1.000 s" in markdown
    # the claims, decided by their checks: cheaper (decided, lower) and "the same error" (decided apart)
    cheaper, same_error = study.claims
    assert f"- {cheaper.text} — **reproduced**" in markdown
    assert f"- {same_error.text} — **not reproduced**" in markdown
    assert (f"    - not reproduced: {IBP} is lower than {BASE} in test error % by 10.00 points (50.0% relative)"
            in markdown)


def test_claim_verdicts_follow_the_checks(study):
    """Each verdict from hand-made numbers: a similarity claim holds when the difference is not
    significant and within the spread; a directional claim needs a decided difference its way;
    too few seeds or a missing column decide nothing."""
    from robustbp.studies.definition import Check, Claim
    from robustbp.studies.report import Metric, claim_verdict

    error = Metric("test error %", "points", {"a": [10, 11, 12, 13, 14], "b": [10.5, 11.5, 12.5, 13.5, 14.5],
                                              "c": [20, 21, 22, 23, 24], "d": [20, 21, 22]})

    def verdict(*checks):
        return claim_verdict(Claim("claim", [Check(*check) for check in checks]), [error])[0]

    assert verdict(("a", "test error", "similar", "b", "test error")) == "reproduced"
    assert verdict(("a", "test error", "lower", "b", "test error")) == "not decidable at this budget"
    assert verdict(("a", "test error", "lower", "c", "test error")) == "reproduced"
    assert verdict(("a", "test error", "higher", "c", "test error")) == "not reproduced"
    assert verdict(("a", "test error", "similar", "c", "test error")) == "not reproduced"
    assert verdict(("a", "test error", "lower", "d", "test error")) == "not decidable at this budget"  # n = 3
    assert verdict(("a", "noise error", "lower", "c", "noise error")) == "not decidable at this budget"
    assert verdict(("a", "test error", "lower", "c", "test error"),
                   ("a", "test error", "higher", "c", "test error")) == "not reproduced"
    assert verdict(("a", "test error", "lower", "c", "test error"),
                   ("a", "test error", "lower", "b", "test error")) == "not decidable at this budget"
    assert claim_verdict(Claim("no checks", []), [error])[0] == "not decidable at this budget"


def test_report_lists_choices_failures_versions_and_missing_runs(study, stand_in_runner):
    markdown = report_markdown(study, "cpu", cpu_runs())
    selection = row_of(markdown, BASE, "## Chosen hyperparameters")
    assert selection[:7] == [BASE, "double-backprop", "p=1", "beta=0.01, p=1", "val_error", "25.0000",
                             "beta=0.01, p=1"]
    assert row_of(markdown, IBP, "## Chosen hyperparameters")[3:6] == ["beta=0.003, p=1 (grid edge)", "val_error",
                                                                       "28.0000"]
    assert ("Chosen at the edge of the grid (1 of 2): the best value may lie outside the grid, so these methods "
            f"may be under- or over-regularized here — {IBP}: beta=0.003 (the smallest of 4).") in markdown
    assert f"- {BASE} (by val_error): beta=0.003, p=1 → 30.0000; beta=0.01, p=1 → 25.0000 (chosen)" in markdown
    assert f"- {IBP} (by val_error): beta=0.003, p=1 → 28.0000 (chosen); beta=0.01, p=1 → failed" in markdown
    assert "- 13 finished (3 model selection, 10 final), 1 failed" in markdown
    assert (f"- failed: `cpu/select/{IBP}/beta=0.01`: NonFiniteLoss: loss is nan at epoch 3, step 17"
            in markdown)
    assert "- robustbp 0.1.0; torch 2.9.0; hosts host-0, host-1" in markdown
    assert "final runs not finished" not in markdown
    partial = [run for run in cpu_runs() if run["key"] != f"cpu/final/{IBP}/seed=4"]
    assert f"final runs not finished (1): {IBP} seed=4" in report_markdown(study, "cpu", partial, chosen=CHOSEN)


def test_fewer_than_four_seeds_cannot_be_decided(study):
    """The smoke budget's two seeds; no clean suite, so the test error comes from the history."""
    runs = [final_run("smoke", BASE, seed, accuracy=None, seconds=1.0, history_error=e)
            for seed, e in zip([0, 1], [30.0, 31.0])]
    runs += [final_run("smoke", IBP, seed, accuracy=None, seconds=0.5, history_error=e)
             for seed, e in zip([0, 1], [10.0, 12.0])]
    markdown = report_markdown(study, "smoke", runs, chosen={})
    assert row_of(markdown, IBP)[2] == mean_sd([10.0, 12.0]) == "11.00 ± 1.41"
    assert (f"{IBP} is lower than {BASE} in test error % by 19.50 points (63.9% relative) (11.00 ± 1.41 against 30.50 ± 0.71, "
            f"n = 2 against 2, p = {2 / comb(4, 2):.4g}): undecidable (n < 4) — cannot be decided at this budget."
            in markdown)
    assert "Test error from the last epoch's history (no clean suite result) for" in markdown
    choice = row_of(markdown, BASE, "## Chosen hyperparameters")[3]
    assert choice == "not chosen (0 of 2 selection runs recorded, 0 failed)"
    assert row_of(markdown, IBP)[-1] == ""  # p = 1/3: no star
    assert "The study records no figures from the paper." in markdown


def test_a_difference_within_the_seeds_spread_cannot_be_decided(study):
    """Complete separation (p < 0.05) but one outlier makes the spread larger than the difference."""
    base = [10.0, 10.1, 10.2, 10.3, 30.0]
    ours = [9.0, 9.1, 9.2, 9.3, 9.4]
    runs = [final_run("cpu", BASE, s, accuracy=1 - e / 100, seconds=1.0) for s, e in enumerate(base)]
    runs += [final_run("cpu", IBP, s, accuracy=1 - e / 100, seconds=1.0) for s, e in enumerate(ours)]
    markdown = report_markdown(study, "cpu", runs, chosen=CHOSEN)
    sentence = next(line for line in markdown.splitlines() if "in test error %" in line)
    assert f"p = {2 / comb(10, 5):.4g}" in sentence
    assert f"significant, but smaller than the seeds' spread (sd {statistics.stdev(base):.2f})" in sentence
    assert sentence.endswith("cannot be decided at this budget.")


def test_paper_figures_beside_ours(tmp_path):
    text = definition.STUDIES_DIR.joinpath("ibp-vs-exact.toml").read_text()
    path = tmp_path / "ibp-vs-exact.toml"
    path.write_text(text + '\n[paper]\n"loss-ibp p=1" = { "test error %" = "1.23 ± 0.04", "note" = "Table 9" }\n'
                           '"standard" = { "test error %" = "2.5" }\n')
    study = definition.load(path)
    markdown = report_markdown(study, "cpu", cpu_runs(), chosen=CHOSEN)
    paper = "## The paper's figures beside ours"
    header = row_of(markdown, "method", paper)
    assert header[:5] == ["method", "paper: test error %", "paper: note", "ours: test error %",
                          "ours: test accuracy %"]
    ibp_errors = [100 * (1 - a) for a in IBP_ACCURACY]
    assert row_of(markdown, IBP, paper)[:5] == [IBP, "1.23 ± 0.04", "Table 9", mean_sd(ibp_errors),
                                                mean_sd([100 * a for a in IBP_ACCURACY])]
    assert row_of(markdown, "standard", paper)[:4] == ["standard", "2.5", "–", "not in this study"]


def test_write_report_writes_markdown_and_the_figures_with_data(study, tmp_path, stand_in_runner):
    out = tmp_path / "report"
    path = write_report(study, "cpu", cpu_runs(), out)
    assert path == out / "report.md" and path.read_text().startswith(f"# {study.title}")
    written = sorted(p.name for p in out.iterdir())
    assert written == ["fgsm.png", "loss.png", "noise.png", "report.md", "seconds.png", "test_error.png"]  # no pgd/linbp data
    for name in set(written) - {"report.md"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in path.read_text()
    with pytest.raises(ValueError, match="no budget"):
        write_report(study, "huge", [], out)


def test_the_runners_own_choice(study):
    """Without a stand-in: robustbp.studies.runner.chosen_params reads the smoke budget's selection runs."""
    pytest.importorskip("robustbp.studies.runner")
    runs = [select_run("smoke", BASE, 0.01, 20.0), select_run("smoke", BASE, 0.1, 15.0),
            select_run("smoke", IBP, 0.01, 12.0), select_run("smoke", IBP, 0.1, math.nan, error="RuntimeError: boom")]
    runs += [final_run("smoke", label, seed, accuracy=0.5, seconds=1.0, params={"p": 1, "beta": beta})
             for label, beta in ((BASE, 0.1), (IBP, 0.01)) for seed in (0, 1)]
    markdown = report_markdown(study, "smoke", runs)
    assert row_of(markdown, BASE, "## Chosen hyperparameters")[3:5] == ["beta=0.1, p=1", "val_error"]
    assert row_of(markdown, IBP, "## Chosen hyperparameters")[3:5] == ["beta=0.01, p=1", "val_error"]
    assert "- failed: `smoke/select/loss-ibp p=1/beta=0.1`: RuntimeError: boom" in markdown


def test_attack_headlines_and_figures(study, tmp_path):
    """PGD and LinBP numbers (ε and steps of LinBP from the budget's suite settings, as the runner
    evaluated them): the headline at the largest budget, and a figure for each."""
    steps = [1, 2, 5, 10, 20]

    def run(label, seed, rate):
        record = final_run("paper", label, seed, accuracy=0.9, seconds=1.0)
        curve = {"steps": steps, "accuracy": [0.5] * 5, "drop": [0.4] * 5, "attack_success_rate": [0.1] * 4 + [rate]}
        record["results"]["suites"]["pgd"] = {"clean_accuracy": 0.9, "gradient_health": {}, "pgd_linf": curve,
                                              "pgd_l2": curve, "tpgd": curve}
        table = [[0.1, 0.2, rate], [0.2, 0.3, rate + 0.1]]  # eps (8/255, 16/255) x steps (10, 20, 100)
        record["results"]["suites"]["linbp"] = {"gradient_health": {}, "has_relu": True,
                                                "bp": {"attack_success_rate": table},
                                                "linbp": {"attack_success_rate": [[r + 0.05 for r in row]
                                                                                  for row in table]}}
        record["results"]["suites"]["boundary"] = {"n": 3, "n_no_change": 0, "median": 0.5 + seed, "q1": 0.4 + seed,
                                                   "q3": 0.7 + seed, "distances": []}
        record["results"]["suites"]["spectral"] = {"error": {"n_iter": [1, 5, 20], "estimate_rel_error_mean": [0.3, 0.05,
                                                                                                              0.01]}}
        return record

    runs = [run(BASE, seed, 0.5) for seed in range(3)] + [run(IBP, seed, 0.3) for seed in range(3)]
    path = write_report(study, "paper", runs, tmp_path, chosen=CHOSEN)
    markdown = path.read_text()
    header = row_of(markdown, "method")
    ibp = dict(zip(header, row_of(markdown, IBP)))
    assert ibp["PGD-Linf success % (ε=32/255, 20 steps)"] == "30.00 ± 0.00"
    assert ibp["PGD-BP success % (ε=16/255, 100 steps)"] == "40.00 ± 0.00"
    assert ibp["PGD-LinBP success % (ε=16/255, 100 steps)"] == "45.00 ± 0.00"
    assert ibp["boundary median L2"] == "1.5000 ± 1.0000"
    assert {"pgd.png", "linbp.png", "test_error.png", "loss.png", "boundary.png", "spectral.png"} <= {
        p.name for p in tmp_path.iterdir()}
    assert "noise.png" not in {p.name for p in tmp_path.iterdir()}


def test_each_entry_is_tested_against_its_own_baseline_and_the_size_figure(tmp_path):
    """dataset-size: loss IBP at each size against standard BP at that size (rank-sum p, relative
    improvement), and the error-against-size figure from the runs' training sizes."""
    study = definition.load("dataset-size")
    errors = {"standard-1000": [20, 21, 22, 23, 24], "loss-ibp-1000": [10, 11, 12, 13, 14],
              "standard-5000": [10, 11, 12, 13, 14], "loss-ibp-5000": [9.5, 10.5, 11.5, 12.5, 13.5]}
    runs = []
    for label, values in errors.items():
        for seed, error in enumerate(values):
            run = final_run("smoke", label, seed, accuracy=1 - error / 100, seconds=1.0)
            run["study"] = "dataset-size"
            run["config"]["train"] = {"train_size": int(label.rsplit("-", 1)[1])}
            runs.append(run)
    chosen = {label: {"params": {"p": 1, "beta": 0.03}, "by": "val_error", "score": 1.0, "candidates": []}
              for label in errors}
    markdown = write_report(study, "smoke", runs, tmp_path, chosen=chosen).read_text()
    p_separated = 2 / comb(10, 5)
    assert row_of(markdown, "loss-ibp-1000")[0] == "loss-ibp-1000 (vs standard-1000)"
    assert row_of(markdown, "loss-ibp-1000")[-2:] == [f"{p_separated:.4g}", "★"]
    assert ("loss-ibp-1000 is lower than standard-1000 in test error % by 10.00 points (45.5% relative)"
            in markdown)  # (22 - 12) / 22
    assert "loss-ibp-5000 is lower than standard-5000 in test error % by 0.50 points (4.2% relative)" in markdown
    assert "standard-5000 is" not in markdown  # a baseline of its own size: tested against nothing
    assert (tmp_path / "dataset_size.png").is_file() and "dataset_size.png" in markdown
