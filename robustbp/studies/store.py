"""The result store: one SQLite file of finished runs, written by one coordinator at a time.

A run is recorded exactly once, in one transaction, under its study and key (method, its
parameters, seed, ...: whatever the runner makes unique within the study), so a study killed at any moment
(`kill -9` included) resumes by skipping the keys already there, without losing or repeating a
finished run. An advisory lock on `PATH.lock` keeps a second coordinator off the same store;
the operating system drops it when its process dies, however it dies.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import sqlite3
import time
from pathlib import Path
from typing import Any

import torch

import robustbp

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT NOT NULL,
    study TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('finished', 'failed')),
    config TEXT NOT NULL,
    seed INTEGER,
    history TEXT,
    results TEXT,
    seconds_per_epoch REAL,
    error TEXT,
    robustbp_version TEXT NOT NULL,
    torch_version TEXT NOT NULL,
    host TEXT NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (study, key)
)
"""
COLUMNS = ("key, study, status, config, seed, history, results, seconds_per_epoch, error, robustbp_version, "
           "torch_version, host, recorded_at")


def _key_per_study(connection: sqlite3.Connection) -> None:
    """Stores written before keys were unique per study (two studies with a run keyed
    `cpu/select/weight-decay/beta=0.0001` collided) get the new key, rows unchanged, in one
    transaction (the caller's connection commits it)."""
    def old_schema() -> bool:
        (table,) = connection.execute("SELECT sql FROM sqlite_master WHERE name = 'runs'").fetchone() or ("",)
        return "key TEXT PRIMARY KEY" in table

    if not old_schema():
        return
    connection.execute("BEGIN IMMEDIATE")  # one migration at a time, all of it or nothing
    if not old_schema():
        return
    connection.execute("ALTER TABLE runs RENAME TO runs_old")
    connection.execute(SCHEMA)
    connection.execute(f"INSERT INTO runs ({COLUMNS}) SELECT {COLUMNS} FROM runs_old")
    connection.execute("DROP TABLE runs_old")


class StoreLocked(RuntimeError):
    """Another coordinator holds the store."""


class ResultStore:
    """`with ResultStore(path) as store:` takes the lock; `store.record(...)`, `store.keys(study)`,
    `store.runs(study)`. Reading (`runs`, `keys`) needs no lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        with self._connection() as connection:
            _key_per_study(connection)
            connection.execute(SCHEMA)

    @contextlib.contextmanager
    def _connection(self):
        """A connection for one transaction (committed on success, rolled back on error), then closed."""
        connection = sqlite3.connect(self.path, timeout=30)
        try:
            connection.execute("PRAGMA journal_mode=WAL")  # readers see the last committed run while one is written
            with connection:
                yield connection
        finally:
            connection.close()

    def __enter__(self) -> "ResultStore":
        self._lock_file = open(f"{self.path}.lock", "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise StoreLocked(f"another coordinator is writing {self.path} (it holds {self.path}.lock)") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def record(self, key: str, study: str, config: dict[str, Any], seed: int | None, *, history: Any = None,
               results: Any = None, seconds_per_epoch: float | None = None, error: str | None = None) -> None:
        """Record one run, finished (no `error`) or failed (with its error). A key is recorded once
        per study: recording it again raises ValueError."""
        if self._lock_file is None:
            raise RuntimeError("record() needs the store's lock: use `with ResultStore(path) as store:`")
        row = (key, study, "failed" if error else "finished", json.dumps(config, sort_keys=True), seed,
               json.dumps(history), json.dumps(results), seconds_per_epoch, error, robustbp.__version__,
               torch.__version__, platform.node() or os.uname().nodename, time.time())
        try:
            with self._connection() as connection:  # one transaction: the row is there entirely or not at all
                connection.execute(f"INSERT INTO runs ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
        except sqlite3.IntegrityError:
            raise ValueError(f"run {key!r} of {study!r} is already recorded in {self.path}") from None

    def keys(self, study: str) -> set[str]:
        """The keys of the runs of `study` already recorded, finished or failed."""
        with self._connection() as connection:
            return {key for (key,) in connection.execute("SELECT key FROM runs WHERE study = ?", (study,))}

    def runs(self, study: str) -> list[dict[str, Any]]:
        """Every recorded run of `study`, in the order recorded, with JSON fields decoded."""
        with self._connection() as connection:
            connection.row_factory = sqlite3.Row
            rows = connection.execute("SELECT * FROM runs WHERE study = ? ORDER BY recorded_at", (study,)).fetchall()
        decoded = []
        for row in rows:
            run = dict(row)
            for name in ("config", "history", "results"):
                run[name] = json.loads(run[name]) if run[name] is not None else None
            decoded.append(run)
        return decoded
