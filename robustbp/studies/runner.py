"""Run a study at a budget: plan its runs, skip those the store already holds, train and evaluate
the rest (in this process, or in N worker processes), and record each run once, as it finishes.

    robustbp study run ibp-vs-exact --budget smoke [--workers N] [--store runs/studies.sqlite]

Two phases, as the papers chose their settings: model selection (every grid point of every
method, the budget's first seed, trained on the training set less `val_size`, scored by the
study's `select_by` after the last epoch), then the final runs (the chosen values, every seed,
the full training set), each evaluated on the first `test_size` test images with the budget's
suites. A study killed at any moment resumes where it stopped: the coordinator alone writes the
store, each finished run in one transaction, and worker processes die with it (the parent-death
signal). A run that fails (a non-finite loss, an exception) is recorded as failed with its error.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from robustbp.studies.definition import Study, split_point, suite_settings
from robustbp.studies.store import ResultStore

DEFAULT_STORE = Path("runs/studies.sqlite")
DEFAULT_RUNS = Path("runs/studies")
BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a study: its store key and everything needed to train it."""

    key: str
    budget: str
    phase: str  # "select" or "final"
    label: str
    method: str
    params: dict[str, Any]
    seed: int
    train: dict[str, Any]  # TrainConfig settings

    def record_config(self) -> dict[str, Any]:
        return {"budget": self.budget, "phase": self.phase, "label": self.label, "method": self.method,
                "params": self.params, "train": self.train}


def _point_text(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(point.items())) or "default"


def _train_settings(study: Study, budget: str, label: str, point: dict, seed: int, val_size) -> dict[str, Any]:
    """TrainConfig settings of one run: the entry's at this budget, then the grid point's own (a
    grid may hold training settings such as lr beside method parameters)."""
    entry = study.method(label)
    method_point, train_point = split_point(point)
    return {**study.train_settings(label, budget), **train_point, "method": entry.method,
            "method_params": {**entry.params, **method_point}, "seed": seed, "val_size": val_size}


def selection_runs(study: Study, budget: str) -> list[PlannedRun]:
    """Every grid point of every method with a grid, on the budget's first `selection_seeds`
    seeds, with a validation split."""
    b = study.budgets[budget]
    seeds = b.seeds[: b.selection_seeds]
    runs = []
    for entry in study.entries(budget):
        grid = study.grid(entry.label, budget)
        for point in entry.grid_points(grid) if grid else []:
            params = {**entry.params, **point}
            for seed in seeds:
                key = f"{budget}/select/{entry.label}/{_point_text(point)}"
                runs.append(PlannedRun(key if len(seeds) == 1 else f"{key}/seed={seed}", budget, "select",
                                       entry.label, entry.method, params, seed,
                                       _train_settings(study, budget, entry.label, point, seed, b.val_size)))
    return runs


def chosen_params(study: Study, budget: str, runs: list[dict]) -> dict[str, dict[str, Any]]:
    """label -> {"params", "by", "score", "candidates": [(params, score), ...]} from the recorded
    selection runs (lowest `select_by` after the last epoch, the mean over the selection seeds; a
    grid point with a failed run scores infinity and is never chosen). A method without a grid
    keeps its fixed parameters (by None). A label whose selection is not complete yet, or all of
    whose selection runs failed, is left out."""
    chosen: dict[str, dict[str, Any]] = {}
    recorded = {run["key"]: run for run in runs}
    planned = selection_runs(study, budget)
    for entry in study.entries(budget):
        mine = [run for run in planned if run.label == entry.label]
        if not mine:
            chosen[entry.label] = {"params": dict(entry.params), "by": None, "score": None, "candidates": []}
            continue
        if any(run.key not in recorded for run in mine):
            continue
        scores: dict[str, tuple[dict, list[float]]] = {}
        for run in mine:
            record = recorded[run.key]
            score = record["history"][-1].get(study.select_by) if record["status"] == "finished" else None
            score = score if score is not None and math.isfinite(score) else math.inf
            scores.setdefault(_point_text(run.params), (run.params, []))[1].append(score)
        candidates = [(params, statistics.fmean(values)) for params, values in scores.values()]
        params, score = min(candidates, key=lambda candidate: candidate[1])
        if math.isinf(score):  # every selection run failed: nothing to choose, no final runs
            continue
        chosen[entry.label] = {"params": params, "by": study.select_by, "score": score, "candidates": candidates}
    return chosen


def final_runs(study: Study, budget: str, chosen: dict[str, dict[str, Any]]) -> list[PlannedRun]:
    """The chosen values of every method with every seed, trained on the full training set."""
    runs = []
    for entry in study.entries(budget):
        if entry.label not in chosen:
            continue
        params = chosen[entry.label]["params"]
        point = {k: v for k, v in params.items() if k not in entry.params or entry.params[k] != v}
        for seed in study.budgets[budget].seeds:
            runs.append(PlannedRun(f"{budget}/final/{entry.label}/seed={seed}", budget, "final", entry.label,
                                   entry.method, params, seed, _train_settings(study, budget, entry.label, point,
                                                                              seed, 0.0)))
    return runs


def execute(run: PlannedRun, study: Study, data: tuple, runs_dir: Path | None = None) -> dict[str, Any]:
    """Train (and, for a final run, evaluate on the test images given) one run; the keyword
    arguments of `ResultStore.record`. With `runs_dir`, the run trains in its own folder there
    (checkpoint every epoch, model.pt at the end) and a run killed midway resumes from it."""
    from robustbp.evaluate import evaluate_runs
    from robustbp.training import TrainConfig, train

    config = TrainConfig(**run.train)
    epochs_trained = 0

    def announce(record: dict[str, Any]) -> None:
        nonlocal epochs_trained
        epochs_trained += 1
        print(f"{study.name} [{run.budget}] {run.phase} {run.label} seed {run.seed}: epoch {record['epoch']}/"
              f"{config.epochs}, test error {record['test_error']:.2f}%, {record['seconds']:.1f} s", file=sys.stderr)

    try:
        folder = None if runs_dir is None else runs_dir.joinpath(study.name, *run.key.split("/"))
        resume = folder is not None and (folder / "checkpoint.pt").is_file()
        result = train(config, folder, resume=resume, overwrite=not resume, progress=False, catch_sigint=False,
                       data=data, on_epoch=announce)
        history = result.history
        seconds = statistics.fmean(epoch["seconds"] for epoch in history)
        results = None
        if run.phase == "final":
            budget, test = study.budgets[run.budget], data[1]
            with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
                evaluation = evaluate_runs({run.label: result.model}, test.images, test.labels,
                                           budget.suites, Path(folder), seed=run.seed, settings=suite_settings(budget))
            results = {"n_points": len(test),
                       "suites": {name: suite["models"][run.label] for name, suite in evaluation["suites"].items()},
                       "settings": {name: suite["settings"] for name, suite in evaluation["suites"].items()},
                       "warnings": evaluation["warnings"]}
        return {"history": history, "results": results, "seconds_per_epoch": seconds,
                "epochs_trained": epochs_trained}
    except Exception as error:  # noqa: BLE001  (recorded as a failed run, with its message)
        return {"error": f"{type(error).__name__}: {error}"}


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under `taskset`), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _worker_start(threads: int) -> None:
    """In each worker: its share of the cores, and death when the coordinator dies (Linux)."""
    torch.set_num_threads(threads)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_WORKER_STATE: dict[str, Any] = {}


def _worker_execute(run: PlannedRun) -> tuple[PlannedRun, dict[str, Any]]:
    return run, execute(run, _WORKER_STATE["study"], _WORKER_STATE["data"], _WORKER_STATE["runs_dir"])


def _worker_init(threads: int, study: Study, data: tuple, runs_dir: Path | None) -> None:
    _worker_start(threads)
    _WORKER_STATE.update(study=study, data=data, runs_dir=runs_dir)


def run_study(study: Study, budget: str, store_path: str | Path = DEFAULT_STORE, workers: int = 1,
              report: Callable[[str], None] = print, data: tuple | None = None, backend: str = "local",
              ray_address: str | None = None, runs_dir: str | Path | None = DEFAULT_RUNS) -> dict[str, int]:
    """Run what the store lacks of `study` at `budget`; returns counts of runs recorded now,
    skipped (already recorded) and failed. backend "local": in this process (workers=1) or in
    `workers` processes; "ray": each run a Ray task (`ray.init(ray_address)`, a local instance by
    default), `workers` at once, results written here by the coordinator alone. runs_dir: where
    runs keep their checkpoints (`runs_dir/STUDY/KEY/`), so that a run killed midway resumes (a
    Ray task resumes where its node sees the folder: give a shared one on a cluster); None keeps
    them in memory."""
    from robustbp import data as datasets

    if budget not in study.budgets:
        raise ValueError(f"unknown budget {budget!r}; {study.name} has {', '.join(study.budgets)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    train_set, test_set = data or datasets.load(study.dataset)
    train_size = len(train_set)
    test_size = study.budgets[budget].test_size
    if test_size is not None and test_size < len(test_set):  # the same points for each epoch's test error and the suites
        test_set = test_set.take(torch.arange(test_size), f"{test_set.name}[:{test_size}]")
    data = (train_set, test_set)
    counts = {"recorded": 0, "skipped": 0, "failed": 0}
    clock = StudyClock(study, budget, train_size)
    with ResultStore(store_path) as store, _ray_session(backend):
        for phase in ("select", "final"):
            recorded = {run["key"] for run in store.runs(study.name)}
            planned = selection_runs(study, budget) if phase == "select" else final_runs(
                study, budget, chosen_params(study, budget, store.runs(study.name)))
            _check_recorded_configs(study, planned, store.runs(study.name))
            todo = [run for run in planned if run.key not in recorded]
            counts["skipped"] += len(planned) - len(todo)
            clock.start_phase(phase, todo)
            folder = None if runs_dir is None else Path(runs_dir).resolve()
            if backend == "ray":
                outcomes = _execute_with_ray(todo, study, data, workers, ray_address, folder)
            else:
                outcomes = _execute_all(todo, study, data, workers, folder)
            for done, (run, outcome) in enumerate(outcomes, start=1):
                epochs_trained = outcome.pop("epochs_trained", None)
                store.record(run.key, study.name, run.record_config(), run.seed, **outcome)
                counts["recorded"] += 1
                counts["failed"] += "error" in outcome
                clock.finished(run, epochs_trained)
                status = outcome.get("error") or f"test error {outcome['history'][-1]['test_error']:.2f}%"
                report(f"{study.name} [{budget}] {phase} {done}/{len(todo)} {run.label} seed {run.seed}: {status}; "
                       f"elapsed {clock.elapsed():.0f} s, study about {clock.left():.0f} s left")
    return counts


def _check_recorded_configs(study: Study, planned: list[PlannedRun], runs: list[dict]) -> None:
    """Refuse to go on when the store holds a planned key under another configuration (the study
    file changed since, or model selection now chooses other values): skipping it would mix the
    two in one report."""
    recorded = {run["key"]: run["config"] for run in runs}
    changed = [run.key for run in planned
               if run.key in recorded and recorded[run.key] != json.loads(json.dumps(run.record_config()))]
    if changed:
        raise ValueError(f"the store holds {len(changed)} run(s) of {study.name} under the same key but another "
                         f"configuration (the study file or the chosen values changed since), e.g. {changed[0]!r}; "
                         "use another --store, or a new label or budget for the changed entry")


def _epochs_of_training(run: PlannedRun, train_size: int) -> float:
    """A run's cost in units of one standard epoch over the whole training set: epochs × the
    share of the training set it sees (the validation split left out)."""
    size = run.train.get("train_size") or train_size
    val = run.train.get("val_size") or 0.0
    kept = size - (val if val >= 1 else val * size)
    return run.train.get("epochs", 1) * kept / max(train_size, 1)


class StudyClock:
    """Elapsed time and an estimate of the time the whole study has left. Each run's cost is
    counted in epochs × training images; the seconds per such unit are measured on the runs
    finished in this process, and an evaluated final run counts `EVALUATION` times more than its
    training alone until a final run has been timed. Before the final phase its runs are known in
    number (every entry × every seed), not yet in their chosen values, so their cost is taken at
    the entry's settings."""

    EVALUATION = 1.3

    def __init__(self, study: Study, budget: str, train_size: int | None = None):
        self.study, self.budget = study, budget
        self.train_size = train_size or 1
        self.started = time.perf_counter()
        self.phase_started = self.started
        self.units_done = {"select": 0.0, "final": 0.0}
        self.seconds = {"select": 0.0, "final": 0.0}
        self.units_left = {"select": 0.0, "final": 0.0}

    def start_phase(self, phase: str, todo: list[PlannedRun]) -> None:
        self.phase_started = time.perf_counter()
        self.units_left[phase] = sum(_epochs_of_training(run, self.train_size) for run in todo)
        if phase == "select":  # the final phase, one run per entry and seed, at the entry's settings
            finals = [PlannedRun("", self.budget, "final", entry.label, entry.method, entry.params, seed,
                                 {**self.study.train_settings(entry.label, self.budget), "val_size": 0.0})
                      for entry in self.study.entries(self.budget) for seed in self.study.budgets[self.budget].seeds]
            self.units_left["final"] = sum(_epochs_of_training(run, self.train_size) for run in finals)

    def finished(self, run: PlannedRun, epochs_trained: int | None = None) -> None:
        """`epochs_trained`: the epochs this process trained, fewer than the run's when it resumed
        from a checkpoint (None: all of them)."""
        now = time.perf_counter()
        units = _epochs_of_training(run, self.train_size)
        epochs = run.train.get("epochs", 1)
        trained = epochs if epochs_trained is None else min(epochs_trained, epochs)
        self.units_done[run.phase] += units * trained / epochs
        self.seconds[run.phase] += now - self.phase_started
        self.units_left[run.phase] = max(0.0, self.units_left[run.phase] - units)
        self.phase_started = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        rates = {phase: self.seconds[phase] / self.units_done[phase] for phase in self.seconds
                 if self.units_done[phase] > 0}
        if not rates:
            return math.nan
        select_rate = rates.get("select", rates.get("final", 0.0) / self.EVALUATION)
        final_rate = rates.get("final", select_rate * self.EVALUATION)
        return self.units_left["select"] * select_rate + self.units_left["final"] * final_rate


def _execute_all(runs: list[PlannedRun], study: Study, data: tuple, workers: int, runs_dir: Path | None):
    """(run, outcome) for every run as it finishes: in this process, or in `workers` processes
    that each get cores / workers torch threads."""
    if workers == 1 or len(runs) <= 1:
        for run in runs:
            yield run, execute(run, study, data, runs_dir)
        return
    threads = max(1, available_cores() // workers)
    with ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(threads, study, data, runs_dir)) as pool:
        futures = [pool.submit(_worker_execute, run) for run in runs]
        for future in as_completed(futures):
            yield future.result()


@contextlib.contextmanager
def _ray_session(backend: str):
    """Shut down the Ray instance this study started, whatever happens."""
    try:
        yield
    finally:
        if backend == "ray":
            import ray

            if ray.is_initialized():
                ray.shutdown()


def _ray_execute(run: PlannedRun, study: Study, data: tuple, threads: int, runs_dir: Path | None
                 ) -> tuple[PlannedRun, dict[str, Any]]:
    torch.set_num_threads(threads)
    return run, execute(run, study, data, runs_dir)


def _execute_with_ray(runs: list[PlannedRun], study: Study, data: tuple, workers: int, ray_address=None,
                      runs_dir: Path | None = None):
    """(run, outcome) for every run as it finishes, each run a Ray task with cores / workers
    threads; with `runs_dir` (a folder every node sees) each task checkpoints there."""
    try:
        import ray
    except ImportError:
        from robustbp.validation import MissingDependency

        raise MissingDependency("--backend ray needs Ray: pip install robustbp[ray]") from None
    if not runs:
        return
    threads = max(1, available_cores() // workers)
    if not ray.is_initialized():  # once per study: run_study shuts it down
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    task = ray.remote(num_cpus=threads)(_ray_execute)
    study_ref, data_ref = ray.put(study), ray.put(data)
    pending = [task.remote(run, study_ref, data_ref, threads, runs_dir) for run in runs]
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        yield ray.get(finished[0])


def status(study: Study, budget: str, store_path: str | Path = DEFAULT_STORE) -> dict[str, Any]:
    """What the store holds of `study` at `budget`: planned, recorded, failed and missing keys."""
    runs = [run for run in ResultStore(store_path).runs(study.name) if run["config"]["budget"] == budget]
    recorded = {run["key"]: run for run in runs}
    planned = selection_runs(study, budget)
    chosen = chosen_params(study, budget, runs)
    if len(chosen) == len(study.entries(budget)):
        planned += final_runs(study, budget, chosen)
    return {"planned": [asdict(run)["key"] for run in planned],
            "recorded": sorted(recorded), "failed": sorted(k for k, r in recorded.items() if r["status"] == "failed"),
            "missing": [run.key for run in planned if run.key not in recorded], "chosen": chosen}
