"""The studies' result store (kill-safe, one coordinator) and the statistics of their reports."""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time

import pytest

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
