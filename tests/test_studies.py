"""The studies' result store (kill-safe, one coordinator) and the statistics of their reports."""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import signal
import time

import pytest
import torch

from robustbp.studies import ResultStore, StoreLocked, rank_sum, summary


def test_summary_is_mean_and_sample_deviation():
    mean, deviation, n = summary([1.0, 2.0, 4.0])
    assert (mean, n) == (7 / 3, 3)
    assert deviation == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert math.isnan(summary([5.0])[1])


@pytest.mark.parametrize("n, p_value", [(3, 2 / 20), (4, 2 / 70), (5, 2 / 252)])
def test_rank_sum_exact_p_values_for_complete_separation(n, p_value):
    """With every method value below every baseline value, the exact two-sided p is 2 / C(2n, n)."""
    result = rank_sum([0.1 * i for i in range(n)], [1 + 0.1 * i for i in range(n)])
    assert result.p_value == pytest.approx(p_value, rel=1e-12)
    assert result.statistic == 0
    assert result.significant == (p_value < 0.05)


def test_rank_sum_of_interleaved_samples_is_not_significant():
    result = rank_sum([1.0, 3.0, 5.0, 7.0, 9.0], [2.0, 4.0, 6.0, 8.0, 10.0])
    assert result.p_value > 0.5 and not result.significant


def test_a_run_is_recorded_once_and_read_back(tmp_path):
    path = tmp_path / "studies.sqlite"
    with ResultStore(path) as store:
        store.record("spectral/standard/seed=0", "spectral", {"method": "standard"}, 0,
                     history={"epochs": [{"loss": 1.5}]}, results={"clean_error": 0.12}, seconds_per_epoch=3.5)
        store.record("spectral/loss-ibp/seed=0", "spectral", {"method": "loss-ibp"}, 0, error="non-finite loss")
        with pytest.raises(ValueError, match="already recorded"):
            store.record("spectral/standard/seed=0", "spectral", {"method": "standard"}, 0)
    reopened = ResultStore(path)
    assert reopened.keys("spectral") == {"spectral/standard/seed=0", "spectral/loss-ibp/seed=0"}
    assert reopened.keys("other") == set()
    finished, failed = reopened.runs("spectral")
    assert finished["status"] == "finished" and finished["results"] == {"clean_error": 0.12}
    assert finished["history"] == {"epochs": [{"loss": 1.5}]} and finished["seconds_per_epoch"] == 3.5
    assert failed["status"] == "failed" and failed["error"] == "non-finite loss"
    assert finished["torch_version"] and finished["host"]


def test_recording_needs_the_lock(tmp_path):
    with pytest.raises(RuntimeError, match="lock"):
        ResultStore(tmp_path / "s.sqlite").record("k", "s", {}, 0)


def _hold_the_lock(path, ready):
    with ResultStore(path):
        ready.set()
        time.sleep(60)


def _record_forever(path, ready):
    with ResultStore(path) as store:
        index = 0
        while True:
            store.record(f"run-{index}", "study", {"index": index}, index, results={"value": index})
            index += 1
            if index == 20:
                ready.set()


def test_a_second_coordinator_is_refused_until_the_first_dies(tmp_path):
    path = tmp_path / "studies.sqlite"
    ResultStore(path)
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_the_lock, args=(path, ready))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(StoreLocked, match="another coordinator"):
        with ResultStore(path):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with ResultStore(path):  # the lock died with its process
        pass


def test_sigkill_while_recording_loses_no_finished_run(tmp_path):
    """Killed between or inside transactions, the store holds whole runs only, each once."""
    path = tmp_path / "studies.sqlite"
    ResultStore(path)
    ready = multiprocessing.Event()
    writer = multiprocessing.Process(target=_record_forever, args=(path, ready))
    writer.start()
    assert ready.wait(30)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    runs = ResultStore(path).runs("study")
    indices = [run["config"]["index"] for run in runs]
    assert len(indices) >= 20 and indices == list(range(len(indices)))  # no gap, no repeat
    assert all(run["results"] == {"value": run["seed"]} for run in runs)


# ---- studies: definitions, runner, command line ----
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from robustbp.studies import definition, runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _planned_keys(study, budget):
    """Every selection key, and one final key per method and seed."""
    finals = {f"{budget}/final/{entry.label}/seed={seed}" for entry in study.entries(budget)
              for seed in study.budgets[budget].seeds}
    return {run.key for run in runner.selection_runs(study, budget)} | finals


@pytest.mark.parametrize("name", definition.available())
def test_every_study_runs_at_smoke(name, tmp_path, capsys):
    study = definition.load(name)
    counts = runner.run_study(study, "smoke", tmp_path / "s.sqlite", report=lambda line: None,
                              runs_dir=tmp_path / "runs")
    progress = capsys.readouterr().err  # a line per epoch of every run: study, phase, method, seed, epoch
    first = study.entries("smoke")[0].label
    assert f"{name} [smoke] final {first} seed {study.budgets['smoke'].seeds[-1]}: epoch 1/" in progress
    runs = ResultStore(tmp_path / "s.sqlite").runs(name)
    assert counts["failed"] == 0, [run["error"] for run in runs if run["error"]]
    assert {run["key"] for run in runs} == _planned_keys(study, "smoke")
    finals = [run for run in runs if run["config"]["phase"] == "final"]
    assert finals and all(set(run["results"]["suites"]) == set(study.budgets["smoke"].suites) for run in finals)
    again = runner.run_study(study, "smoke", tmp_path / "s.sqlite", report=lambda line: None, runs_dir=None)
    assert again == {"recorded": 0, "skipped": len(runs), "failed": 0}
    from robustbp.studies.report import write_report

    text = write_report(study, "smoke", runs, tmp_path / "report").read_text()
    assert all(f"| {entry.label}" in text for entry in study.entries("smoke"))
    assert all(deviation in text for deviation in study.deviations)
    assert (tmp_path / "report" / "seconds.png").is_file()
    if name == "dataset-size":  # two sizes at smoke: the error-against-size figure
        assert (tmp_path / "report" / "dataset_size.png").is_file()


def test_model_selection_takes_the_lowest_validation_score():
    study = definition.load("ibp-vs-exact")
    runs = []
    for run in runner.selection_runs(study, "smoke"):
        score = 10.0 if run.params["beta"] == 0.1 else 20.0
        runs.append({"key": run.key, "status": "finished", "history": [{"val_error": 99.0}, {"val_error": score}]})
    chosen = runner.chosen_params(study, "smoke", runs)
    assert chosen["loss-ibp p=1"]["params"] == {"p": 1, "beta": 0.1} and chosen["loss-ibp p=1"]["score"] == 10.0
    runs[-1] = {"key": runs[-1]["key"], "status": "failed", "history": None}  # a failed run is never chosen
    assert runner.chosen_params(study, "smoke", runs)["loss-ibp p=1"]["params"]["beta"] == 0.01
    assert "loss-ibp p=1" not in runner.chosen_params(study, "smoke", runs[:-1])  # selection not complete


def test_a_bad_study_file_gets_one_error_naming_the_field(tmp_path):
    text = (ROOT / "studies" / "ibp-vs-exact.toml").read_text()
    bad = tmp_path / "ibp-vs-exact.toml"
    bad.write_text(text.replace('baseline = "double-backprop p=1"', 'baseline = "nobody"'))
    with pytest.raises(ValueError, match="baseline 'nobody' is not one of the methods' labels"):
        definition.load(bad)
    bad.write_text(text.replace("grid = { beta = [0.003, 0.01, 0.03, 0.1] }", "grid = { beta = [-1] }", 1))
    with pytest.raises(ValueError, match="double-backprop: beta must be a finite number >= 0"):
        definition.load(bad)


def _children(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children |= {int(p) for p in (task / "children").read_text().split()}
    return children


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_killed_coordinator_resumes_and_leaves_no_worker(tmp_path):
    """SIGKILL the coordinator of a two-worker study mid-way: its workers die with it, and the
    rerun completes the study with every run recorded exactly once."""
    store = tmp_path / "s.sqlite"
    command = [sys.executable, "-m", "robustbp", "study", "run", "ibp-vs-exact", "--store", str(store), "--workers", "2",
               "--runs-dir", str(tmp_path / "runs")]
    coordinator = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, set()
    while time.time() < deadline and (not store.exists() or len(ResultStore(store).runs("ibp-vs-exact")) < 2):
        workers |= _children(coordinator.pid)
        time.sleep(0.05)
    workers |= _children(coordinator.pid)
    os.kill(coordinator.pid, signal.SIGKILL)
    coordinator.wait()
    recorded_before = len(ResultStore(store).runs("ibp-vs-exact"))
    assert 2 <= recorded_before < 8 and workers
    time.sleep(1.0)
    assert not [pid for pid in workers if _alive(pid)]  # no stray worker writes on
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    keys = [run["key"] for run in ResultStore(store).runs("ibp-vs-exact")]
    assert len(keys) == len(set(keys)) == 8


def test_study_command_line(tmp_path, capsys):
    from robustbp.cli import main

    assert main(["study", "list"]) == 0
    assert "ibp-vs-exact" in capsys.readouterr().out
    store = str(tmp_path / "s.sqlite")
    assert main(["study", "status", "ibp-vs-exact", "--store", store]) == 0
    assert "0 of 4 planned runs recorded" in capsys.readouterr().out
    assert main(["study", "run", "no-such-study"]) == 1
    assert "unknown study 'no-such-study'" in capsys.readouterr().err
    with ResultStore(store):  # another coordinator holds the store: one line, exit 1
        assert main(["study", "run", "ibp-vs-exact", "--store", store]) == 1
    error = capsys.readouterr().err
    assert error.startswith("robustbp: error: another coordinator is writing") and error.count("\n") == 1


def test_the_ray_backend_records_what_the_local_one_does(tmp_path):
    """The same smoke study through Ray (one thread per task, as here): the same keys and configs,
    metrics equal within float tolerance (hosts and seconds aside)."""
    pytest.importorskip("ray")  # an optional extra: `make` installs it, so CI runs this
    study = definition.load("ibp-vs-exact")
    runner.run_study(study, "smoke", tmp_path / "local.sqlite", report=lambda line: None, runs_dir=None)
    runner.run_study(study, "smoke", tmp_path / "ray.sqlite", workers=2, backend="ray", report=lambda line: None,
                     runs_dir=tmp_path / "ray-runs")
    assert len(list((tmp_path / "ray-runs" / "ibp-vs-exact" / "smoke").glob("*/*/*/model.pt"))) == 8  # checkpointed
    local = {run["key"]: run for run in ResultStore(tmp_path / "local.sqlite").runs("ibp-vs-exact")}
    remote = {run["key"]: run for run in ResultStore(tmp_path / "ray.sqlite").runs("ibp-vs-exact")}
    assert set(local) == set(remote) and len(local) == 8
    for key, run in local.items():
        other = remote[key]
        assert run["config"] == other["config"] and run["status"] == other["status"] == "finished"
        for mine, theirs in zip(run["history"], other["history"]):
            for metric in ("loss", "val_error", "val_loss", "test_error"):  # val_ ones None in final runs
                assert _close(mine[metric], theirs[metric]), (key, metric)
        if run["results"]:
            assert _close(run["results"], other["results"]), key


def _close(a, b) -> bool:
    """Equal structures, numbers within float tolerance."""
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return b == pytest.approx(a, rel=1e-5, abs=1e-6)
    return a == b


def test_entries_carry_their_own_training_settings_and_grids_may_hold_them(tmp_path):
    """An entry's `train` (dropout here) and a grid over a training setting (lr) reach the runs'
    configs; the chosen lr is what the final runs train with."""
    text = (ROOT / "studies" / "ibp-vs-exact.toml").read_text()
    text = text.replace('''label = "loss-ibp p=1"
method = "loss-ibp"
params = { p = 1 }
grid = { beta = [0.003, 0.01, 0.03, 0.1] }''', '''label = "loss-ibp p=1"
method = "loss-ibp"
params = { p = 1, beta = 0.01 }
grid = { lr = [0.01, 0.05] }
train = { dropout = 0.5 }''')
    path = tmp_path / "ibp-vs-exact.toml"
    path.write_text(text.replace('"loss-ibp p=1" = { beta = [0.01, 0.1] }', '"loss-ibp p=1" = { lr = [0.01, 0.05] }'))
    study = definition.load(path)
    mine = [run for run in runner.selection_runs(study, "smoke") if run.label == "loss-ibp p=1"]
    assert [(run.train["lr"], run.train["dropout"], run.train["method_params"]) for run in mine] == [
        (0.01, 0.5, {"p": 1, "beta": 0.01}), (0.05, 0.5, {"p": 1, "beta": 0.01})]
    records = [{"key": run.key, "status": "finished", "history": [{"val_error": 10.0 if run.train["lr"] == 0.05
                                                                    else 20.0}]} for run in mine]
    chosen = runner.chosen_params(study, "smoke", records)
    finals = runner.final_runs(study, "smoke", chosen)
    assert {run.train["lr"] for run in finals if run.label == "loss-ibp p=1"} == {0.05}
    assert all(run.train["dropout"] == 0.5 for run in finals if run.label == "loss-ibp p=1")


def test_a_run_killed_midway_resumes_from_its_own_checkpoint(tmp_path):
    """A run whose folder holds a checkpoint after epoch 1 continues from it: the same history as
    an uninterrupted run, epoch 1 not trained again."""
    from robustbp import data as datasets
    from robustbp.training import TrainConfig, train

    study = definition.load("ibp-vs-exact")
    run = runner.final_runs(study, "smoke", {entry.label: {"params": entry.params} for entry in study.methods})[0]
    run = runner.PlannedRun(run.key, run.budget, run.phase, run.label, run.method, run.params, run.seed,
                            {**run.train, "epochs": 2})
    train_set, test_set = datasets.load("fashion-mnist")
    data = (train_set, test_set.take(torch.arange(60)))
    folder = tmp_path / "runs" / study.name / "smoke" / "final" / run.label / f"seed={run.seed}"
    partial = train(TrainConfig(**{**run.train, "epochs": 1}), folder, progress=False, catch_sigint=False, data=data)
    resumed = runner.execute(run, study, data, tmp_path / "runs")
    whole = runner.execute(run, study, data, None)
    assert [e["epoch"] for e in resumed["history"]] == [1, 2]
    for mine, theirs in zip(resumed["history"], whole["history"]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
        assert mine["test_error"] == pytest.approx(theirs["test_error"])
    assert resumed["history"][0]["seconds"] == partial.history[0]["seconds"]  # epoch 1 read back, not retrained


def _selection_records(runs, score_of):
    return [{"key": run.key, "status": "finished", "history": [{"val_loss": score_of(run)}]} for run in runs]


def test_selection_over_several_seeds_takes_the_mean_score(tmp_path):
    """selection_seeds = 3: every grid point is trained with the first three seeds (keys end in
    the seed) and the point with the lowest MEAN score is chosen, not the best single run."""
    text = (ROOT / "studies" / "spectral.toml").read_text().replace(
        "[budgets.smoke]\n", "[budgets.smoke]\nselection_seeds = 2\n", 1)
    path = tmp_path / "spectral.toml"
    path.write_text(text)
    study = definition.load(path)
    mine = [run for run in runner.selection_runs(study, "smoke") if run.label == "frobenius"]
    assert [(run.params["beta"], run.seed) for run in mine] == [(1e-3, 0), (1e-3, 1), (1e-1, 0), (1e-1, 1)]
    assert mine[0].key == "smoke/select/frobenius/beta=0.001/seed=0"
    scores = {(1e-3, 0): 1.0, (1e-3, 1): 9.0, (1e-1, 0): 4.0, (1e-1, 1): 4.0}  # means 5 and 4
    all_runs = runner.selection_runs(study, "smoke")
    chosen = runner.chosen_params(study, "smoke", _selection_records(
        all_runs, lambda run: scores.get((run.params["beta"], run.seed), 1.0)))
    assert chosen["frobenius"]["params"]["beta"] == 1e-1 and chosen["frobenius"]["score"] == 4.0
    assert sorted(score for _, score in chosen["frobenius"]["candidates"]) == [4.0, 5.0]
    bad = tmp_path / "bad" / "spectral.toml"
    bad.parent.mkdir()
    bad.write_text(text.replace("selection_seeds = 2", "selection_seeds = 3"))
    with pytest.raises(ValueError, match="selection_seeds must be an integer from 1 to the number of seeds \\(2\\)"):
        definition.load(bad)


def test_the_spectral_paper_budget_grids_lr_batch_and_strength_over_five_seeds():
    study = definition.load("spectral")
    runs = runner.selection_runs(study, "paper")
    spectral = [run for run in runs if run.label == "spectral"]
    assert len(spectral) == 2 * 2 * 4 * 5 and len(runs) == (4 + 4 * 16) * 5
    assert {(run.train["lr"], run.train["batch_size"]) for run in spectral} == {
        (0.01, 16), (0.01, 32), (0.001, 16), (0.001, 32)}
    assert all(run.train["method_params"]["n_iter"] == 1 for run in spectral)


def test_a_budget_runs_its_own_entries_with_their_own_settings():
    """A budget's `methods` picks the entries it runs; the training settings stack up as study,
    entry, budget, then the budget's own for the entry; an entry has its own baseline."""
    study = definition.load("adversarial-backprop")
    assert [entry.label for entry in study.entries("cpu")] == ["bp-2x800-relu", "advbp-2x800-relu"]
    assert len(study.entries("paper")) == 18
    settings = study.train_settings("advbp-2x400-logistic", "paper")
    assert (settings["model"], settings["activation"], settings["lr"], settings["batch_size"]) == (
        "mlp-2x400", "logistic", 0.5, 10)
    assert study.baseline_of("advbp-2x400-logistic") == "bp-2x400-logistic"
    finals = runner.final_runs(study, "cpu", {label: {"params": study.method(label).params}
                                              for label in ("bp-2x800-relu", "advbp-2x800-relu")})
    assert {run.label for run in finals} == {"bp-2x800-relu", "advbp-2x800-relu"} and len(finals) == 10
    sizes = definition.load("dataset-size")
    assert sizes.train_settings("loss-ibp-5000", "smoke")["train_size"] == 160  # the budget's own, per entry
    assert sizes.train_settings("loss-ibp-5000", "paper")["train_size"] == 5000  # the entry's
    assert sizes.train_settings("loss-ibp-aug-5000", "paper")["augment"] is True


def test_bad_budget_fields_get_one_error_naming_them(tmp_path):
    text = (ROOT / "studies" / "adversarial-backprop.toml").read_text()
    cases = [
        ('methods = ["bp-2x800-relu", "advbp-2x800-relu"]', 'methods = ["advbp-2x800-relu"]',
         "budget cpu: runs 'advbp-2x800-relu' but not its baseline 'bp-2x800-relu'"),
        ('methods = ["bp-2x800-relu", "advbp-2x800-relu"]', 'methods = ["bp-2x800-relu", "nobody"]',
         r"budget cpu: methods names unknown labels \['nobody'\]"),
        ('baseline = "bp-2x400-tanh"\ntrain', 'baseline = "nobody"\ntrain',
         "method 'advbp-2x400-tanh': baseline 'nobody' is not one of the labels"),
        ("[budgets.cpu]\n", "[budgets.cpu]\nepochs = 3\n", r"budget cpu: unknown fields \['epochs'\]"),
    ]
    for old, new, message in cases:
        assert old in text, old
        path = tmp_path / "adversarial-backprop.toml"
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ValueError, match=message):
            definition.load(path)


def test_the_time_left_covers_the_whole_study(monkeypatch):
    """Before the final phase, the estimate counts the final runs too (one per entry and seed, at
    the entry's settings), each run's cost in epochs × training images."""
    study = definition.load("ibp-vs-exact")
    now = [0.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: now[0])
    clock = runner.StudyClock(study, "smoke", train_size=1000)
    selection = runner.selection_runs(study, "smoke")
    clock.start_phase("select", selection)
    settings = study.train_settings(selection[0].label, "smoke")
    unit = settings["epochs"] * settings["train_size"] / 1000  # one final run's cost
    select_unit = unit * (settings["train_size"] - study.budgets["smoke"].val_size) / settings["train_size"]
    now[0] = 10.0
    clock.finished(selection[0])
    rate = 10.0 / select_unit
    n_finals = len(study.entries("smoke")) * len(study.budgets["smoke"].seeds)
    expected = (len(selection) - 1) * select_unit * rate + n_finals * unit * rate * runner.StudyClock.EVALUATION
    assert clock.left() == pytest.approx(expected)
    assert clock.elapsed() == 10.0


def test_a_resumed_run_counts_only_the_epochs_it_trained(monkeypatch):
    """A run that resumed from its checkpoint and trained one of its epochs in 10 s measures the
    rate of one epoch, not of the whole run (after a restart the estimate read 1,809 s left for
    a study that then ran 8,817 s)."""
    study = definition.load("ibp-vs-exact")
    now = [0.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: now[0])
    epochs = 4
    selection = [dataclasses.replace(run, train={**run.train, "epochs": epochs})
                 for run in runner.selection_runs(study, "smoke")]
    whole, resumed = runner.StudyClock(study, "smoke", 1000), runner.StudyClock(study, "smoke", 1000)
    for clock in (whole, resumed):
        clock.start_phase("select", selection)
    now[0] = 10.0
    whole.finished(selection[0])
    resumed.finished(selection[0], epochs_trained=1)
    assert resumed.left() == pytest.approx(whole.left() * epochs)


def test_the_study_files_ship_inside_the_package(tmp_path):
    """A wheel (not an editable install) holds every study file, where `definition` looks."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    import zipfile

    (wheel,) = tmp_path.glob("robustbp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"robustbp/studies/definitions/{name}.toml" for name in definition.available()} <= names
    assert definition.STUDIES_DIR == ROOT / "robustbp" / "studies" / "definitions"
    assert (ROOT / "studies").resolve() == definition.STUDIES_DIR


def test_two_studies_may_share_a_key_and_an_old_store_is_migrated(tmp_path):
    """Keys are unique per study: spectral and leaderboard both have a run keyed
    cpu/select/weight-decay/beta=0.0001. A store made with the old schema (key alone unique)
    keeps its rows and takes the second study's run."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE runs (key TEXT PRIMARY KEY, study TEXT NOT NULL, status TEXT NOT NULL, "
                           "config TEXT NOT NULL, seed INTEGER, history TEXT, results TEXT, seconds_per_epoch REAL, "
                           "error TEXT, robustbp_version TEXT NOT NULL, torch_version TEXT NOT NULL, "
                           "host TEXT NOT NULL, recorded_at REAL NOT NULL)")
        connection.execute("INSERT INTO runs VALUES ('cpu/select/a', 'spectral', 'finished', '{}', 0, '[1]', "
                           "'null', 2.5, NULL, '0.1.0', '2.13.0', 'vm', 1.0)")
    connection.close()
    with ResultStore(path) as store:
        store.record("cpu/select/a", "leaderboard", {"x": 1}, 0, history=[2])
        with pytest.raises(ValueError, match="'cpu/select/a' of 'leaderboard' is already recorded"):
            store.record("cpu/select/a", "leaderboard", {"x": 1}, 0, history=[2])
    (old,) = ResultStore(path).runs("spectral")
    assert (old["history"], old["seconds_per_epoch"], old["host"]) == ([1], 2.5, "vm")
    assert ResultStore(path).runs("leaderboard")[0]["config"] == {"x": 1}


def test_a_bad_claim_check_gets_one_error_naming_it(tmp_path):
    text = (ROOT / "studies" / "spectral.toml").read_text()
    old = '{ label = "spectral", metric = "test error", direction = "lower", against = "none" }'
    for new, message in [(old.replace('against = "none"', 'against = "nobody"'), "unknown label 'nobody'"),
                         (old.replace('"lower"', '"better"'), "direction must be one of"),
                         (old.replace('label = "spectral"', 'label = "none"'), "compares 'none' with itself")]:
        path = tmp_path / "spectral.toml"
        path.write_text(text.replace(old, new, 1))
        with pytest.raises(ValueError, match=message):
            definition.load(path)


def test_a_recorded_key_with_another_configuration_is_refused(tmp_path):
    """When the study file changed after a run was recorded (here: its epochs), the runner refuses
    instead of skipping the key and mixing two configurations in one report."""
    study = definition.load("ibp-vs-exact")
    first = runner.selection_runs(study, "smoke")[0]
    config = first.record_config()
    with ResultStore(tmp_path / "s.sqlite") as store:
        store.record(first.key, study.name, {**config, "train": {**config["train"], "epochs": 7}}, first.seed,
                     history=[{"val_error": 1.0}])
    with pytest.raises(ValueError, match="under the same key but another configuration"):
        runner.run_study(study, "smoke", tmp_path / "s.sqlite", report=lambda line: None, runs_dir=None)
