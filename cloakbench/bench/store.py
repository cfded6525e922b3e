"""The results store: one embedded SQLite database per results folder (``<run>/results.sqlite``).

Rows at two grains — one per (cell, query photo) in ``queries`` and one summary per cell in ``cells`` — plus
per-photo cloak quality (``cloaks``), retrained models (``adaptations``), service query counts, per-stage
timings, events (a batch halved after a CUDA out-of-memory error), the first protected photos' grids, the
suite the folder belongs to, and one ``attempts`` row (with the run metadata) per start of the suite here.

Every finished task (see :mod:`cloakbench.bench.plan`) is committed in **one** ``BEGIN IMMEDIATE``
transaction together with its ``tasks`` row, so a run killed at any instant (SIGKILL included) leaves each
task either entirely in the store or not at all; WAL journaling keeps readers and a second writer safe, and a
task that another process already committed ``ok`` is never written twice. A failed task is a ``tasks`` row
with ``status = failed`` and its error (and failed cells in ``cells``); a resumed run tries it again.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import socket
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cloakbench.errors import ConfigError
from cloakbench.png import decode_png, encode_png

STORE_FILE = "results.sqlite"
SCHEMA_VERSION = 1

# Column types of each row table: INTEGER, REAL, TEXT or BOOL (stored as INTEGER, read back as bool).
# REAL columns in NAN_COLUMNS read back NULL as NaN (SQLite stores NaN as NULL): "no number here".
KEY = {"seed": "INTEGER", "protocol": "TEXT", "defense": "TEXT", "recognizer": "TEXT", "countermeasure": "TEXT",
       "classifier": "TEXT", "oblivious": "BOOL"}  # fmt: skip
TABLES: dict[str, dict[str, str]] = {
    "cells": {
        **KEY, "status": "TEXT", "note": "TEXT", "n_identities": "INTEGER", "n_queries": "INTEGER",
        "protection_rate": "REAL", "ci_low": "REAL", "ci_high": "REAL", "protection_rate_identity_mean": "REAL",
        "top5_accuracy": "REAL", "top50_accuracy": "REAL", "clean_accuracy_protected": "REAL",
        "clean_accuracy_all": "REAL", "cloak_s_per_image": "REAL",
    },
    "queries": {
        **KEY, "protected_identity": "TEXT", "image_id": "TEXT", "predicted": "TEXT", "rank": "INTEGER",
        "correct": "BOOL", "rank_clean": "INTEGER", "correct_clean": "BOOL", "true_similarity": "REAL",
        "true_similarity_clean": "REAL",
    },
    "cloaks": {
        "seed": "INTEGER", "defense": "TEXT", "identity": "TEXT", "image_id": "TEXT", "linf": "REAL", "l2": "REAL",
        "psnr": "REAL", "ssim": "REAL", "dssim": "REAL",
    },
    "adaptations": {
        "seed": "INTEGER", "training_seed": "INTEGER", "recognizer": "TEXT", "countermeasure": "TEXT",
        "defense": "TEXT", "protected_identity": "TEXT", "training_set": "TEXT", "adaptation": "TEXT",
        "n_images": "INTEGER", "n_identities": "INTEGER", "epochs": "INTEGER", "seconds": "REAL",
        "images_per_s": "REAL", "cached": "BOOL", "device": "TEXT", "final_loss": "REAL",
        "final_train_accuracy": "REAL", "config_hash": "TEXT", "clean_accuracy_before": "REAL",
        "clean_accuracy_after": "REAL", "note": "TEXT",
    },
}  # fmt: skip
NAN_COLUMNS = frozenset(
    {"protection_rate", "ci_low", "ci_high", "protection_rate_identity_mean", "top5_accuracy", "top50_accuracy",
     "clean_accuracy_protected", "clean_accuracy_all", "true_similarity", "true_similarity_clean"}
)  # fmt: skip
# Columns that measure this machine on this attempt rather than the result: they may differ between two runs
# of one suite (a resumed run reuses a cached checkpoint: ``cached`` flips, ``seconds`` is the reload time).
# ``cloak_s_per_image`` is what the cloak cost the run (or the earlier run whose cached cloak it read).
MEASURED_COLUMNS = frozenset({"seconds", "images_per_s", "cached", "device", "cloak_s_per_image"})

_SQL_TYPE = {"INTEGER": "INTEGER", "REAL": "REAL", "TEXT": "TEXT", "BOOL": "INTEGER"}


def _schema() -> str:
    parts = [
        "CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS attempts (
            id INTEGER PRIMARY KEY AUTOINCREMENT, started_utc TEXT NOT NULL, finished_utc TEXT, status TEXT NOT NULL,
            executor TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, metadata TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS tasks (
            task_key TEXT PRIMARY KEY, kind TEXT NOT NULL, seed INTEGER NOT NULL, subject TEXT NOT NULL,
            countermeasure TEXT NOT NULL, status TEXT NOT NULL, error TEXT NOT NULL, seconds REAL NOT NULL,
            cache_hits INTEGER NOT NULL, cache_misses INTEGER NOT NULL, worker TEXT NOT NULL,
            attempt_id INTEGER NOT NULL, finished_utc TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS timings (
            task_key TEXT NOT NULL, stage TEXT NOT NULL, seconds REAL NOT NULL, PRIMARY KEY (task_key, stage))""",
        """CREATE TABLE IF NOT EXISTS service_usage (
            task_key TEXT NOT NULL, operation TEXT NOT NULL, count INTEGER NOT NULL,
            PRIMARY KEY (task_key, operation))""",
        """CREATE TABLE IF NOT EXISTS events (
            task_key TEXT NOT NULL, kind TEXT NOT NULL, detail TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS grids (
            task_key TEXT NOT NULL, defense TEXT PRIMARY KEY, png BLOB NOT NULL)""",
    ]
    for table, columns in TABLES.items():
        cols = ", ".join(f'"{c}" {_SQL_TYPE[t]}' for c, t in columns.items())
        parts.append(f"CREATE TABLE IF NOT EXISTS {table} (task_key TEXT NOT NULL, {cols})")
        parts.append(f"CREATE INDEX IF NOT EXISTS {table}_task ON {table} (task_key)")
    parts.append(
        "CREATE UNIQUE INDEX IF NOT EXISTS cells_key ON cells (seed, protocol, defense, recognizer, countermeasure, "
        "classifier)"
    )
    return ";\n".join(parts)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _encode(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "BOOL":
        return int(bool(value))
    if kind == "INTEGER":
        return int(value)
    if kind == "REAL":
        v = float(value)
        return None if math.isnan(v) else v
    return str(value)


def _decode(value: Any, kind: str, column: str) -> Any:
    if value is None:
        return float("nan") if column in NAN_COLUMNS else None
    if kind == "BOOL":
        return bool(value)
    return value


S = TypeVar("S", bound="SqliteFile")


class SqliteFile:
    """An SQLite file opened for one process: WAL journal, a busy timeout (a second writer waits), explicit
    ``BEGIN IMMEDIATE`` transactions. The results store and the bench tables share it."""

    def __init__(self, path: Path, *, timeout_s: float = 120.0) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: a killed process never loses a commit
        self._db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")  # takes the write lock now: no deadlock upgrading a read lock
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


class ResultsStore(SqliteFile):
    """The SQLite results store of one results folder. Open one per process (connections are not shared)."""

    def __init__(self, path: Path, *, timeout_s: float = 120.0) -> None:
        super().__init__(path, timeout_s=timeout_s)
        self._db.executescript(
            "BEGIN IMMEDIATE;\n" + _schema() + ";\n"
            f"INSERT OR IGNORE INTO run VALUES ('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;"
        )
        version = self.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(f"{path}: results store schema version {version}, this cloakbench reads {SCHEMA_VERSION}")

    @classmethod
    def in_folder(cls, folder: Path) -> ResultsStore:
        return cls(folder / STORE_FILE)

    # -- the run: which suite this folder holds, and every attempt at it --------------------------------

    def get(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM run WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO run VALUES (?, ?)", (key, json.dumps(value, default=str)))

    def bind_suite(self, suite: Mapping[str, Any], digest: str) -> bool:
        """Record the suite this folder holds; False if it already held it (a resume). A different suite is
        refused: mixing two suites' rows in one store would make every table wrong."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM run WHERE key = 'suite_digest'").fetchone()
            if row is None:
                db.execute("INSERT INTO run VALUES ('suite_digest', ?)", (json.dumps(digest),))
                db.execute("INSERT INTO run VALUES ('suite', ?)", (json.dumps(suite),))
                db.execute("INSERT INTO run VALUES ('created_utc', ?)", (json.dumps(utc_now()),))
                return True
        if json.loads(row[0]) == digest:
            return False
        stored = self.get("suite") or {}
        changed = sorted(k for k in set(stored) | set(suite) if stored.get(k) != suite.get(k))
        raise ConfigError(
            f"{self.path.parent}: this results folder holds another version of suite {stored.get('name')!r} "
            f"(differs in: {', '.join(changed) or 'resolved values'}); resuming would mix two grids. "
            "Use a new --out folder, or restore the suite file it was started with"
        )

    def start_attempt(self, *, executor: str, metadata: Mapping[str, Any]) -> int:
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO attempts (started_utc, status, executor, host, pid, metadata) VALUES (?, ?, ?, ?, ?, ?)",
                (utc_now(), "running", executor, socket.gethostname(), os.getpid(), json.dumps(metadata, default=str)),
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    def finish_attempt(self, attempt: int, *, status: str, metadata: Mapping[str, Any] | None = None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE attempts SET finished_utc = ?, status = ? WHERE id = ?", (utc_now(), status, attempt))
            if metadata is not None:
                db.execute(
                    "UPDATE attempts SET metadata = ? WHERE id = ?", (json.dumps(metadata, default=str), attempt)
                )

    def attempts(self) -> list[dict[str, Any]]:
        cur = self._db.execute("SELECT * FROM attempts ORDER BY id")
        names = [d[0] for d in cur.description]
        return [
            {**dict(zip(names, r, strict=True)), "metadata": json.loads(r[names.index("metadata")])}
            for r in cur.fetchall()
        ]

    # -- tasks -------------------------------------------------------------------------------------------

    def task_states(self) -> dict[str, str]:
        """task key -> status (ok / failed) of every committed task."""
        return dict(self._db.execute("SELECT task_key, status FROM tasks").fetchall())

    def commit(self, result: Any, *, attempt: int) -> bool:
        """Write one finished task (a :class:`cloakbench.bench.runner.TaskResult`) in one transaction.

        Returns False, writing nothing, when the task is already committed ``ok`` (another process finished it
        first); a previous ``failed`` commit of the task is replaced."""
        task = result.task
        key = task.key
        with self._transaction() as db:
            row = db.execute("SELECT status FROM tasks WHERE task_key = ?", (key,)).fetchone()
            if row is not None and row[0] == "ok":
                return False
            for table in (*TABLES, "timings", "service_usage", "events", "grids", "tasks"):
                db.execute(f"DELETE FROM {table} WHERE task_key = ?", (key,))
            for table, rows in (
                ("cells", result.summary), ("queries", result.queries), ("cloaks", result.cloaks),
                ("adaptations", result.adaptations),
            ):  # fmt: skip
                self._insert(db, table, key, rows)
            db.executemany(
                "INSERT INTO timings VALUES (?, ?, ?)", [(key, s, float(v)) for s, v in sorted(result.stages.items())]
            )
            db.executemany(
                "INSERT INTO service_usage VALUES (?, ?, ?)",
                [(key, op, int(n)) for op, n in sorted(result.service_usage.items())],
            )
            db.executemany(
                "INSERT INTO events VALUES (?, ?, ?)", [(key, e["kind"], e["detail"]) for e in result.events]
            )
            db.executemany(
                "INSERT OR REPLACE INTO grids VALUES (?, ?, ?)",
                [(key, label, encode_png(img)) for label, img in sorted(result.grids.items())],
            )
            db.execute(
                "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, task.kind.value, task.seed, task.subject, task.countermeasure, result.status, result.error,
                 result.seconds, result.cache_hits, result.cache_misses, result.worker, attempt, utc_now()),
            )  # fmt: skip
        return True

    @staticmethod
    def _insert(db: sqlite3.Connection, table: str, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        columns = TABLES[table]
        if not rows:
            return
        for row in rows:
            unknown = set(row) - set(columns)
            if unknown:
                raise ValueError(f"{table}: row has columns the store does not know: {sorted(unknown)}")
        names = ", ".join(f'"{c}"' for c in columns)
        marks = ", ".join("?" for _ in range(len(columns) + 1))
        db.executemany(
            f"INSERT INTO {table} (task_key, {names}) VALUES ({marks})",
            [(key, *(_encode(r.get(c), t) for c, t in columns.items())) for r in rows],
        )

    # -- reading -----------------------------------------------------------------------------------------

    def rows(self, table: str, *, with_task: bool = False) -> list[dict[str, Any]]:
        """Every row of a row table, in commit order; failed cells keep only their key, status and note."""
        if table in TABLES:
            columns = TABLES[table]
            cur = self._db.execute(f"SELECT task_key, * FROM {table} ORDER BY rowid")
            names = [d[0] for d in cur.description]
            out = []
            for r in cur.fetchall():
                values = dict(zip(names[1:], r[1:], strict=True))
                row = {c: _decode(values[c], columns[c], c) for c in columns}
                if with_task:
                    row = {"task_key": r[0], **row}
                out.append(row)
            return out
        cur = self._db.execute(f"SELECT * FROM {table} ORDER BY rowid")  # tasks, timings, service_usage, attempts
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def grids(self) -> dict[str, np.ndarray]:
        return {label: decode_png(blob) for label, blob in self._db.execute("SELECT defense, png FROM grids")}

    def service_usage(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key, op, n in self._db.execute("SELECT task_key, operation, count FROM service_usage ORDER BY rowid"):
            out.setdefault(key, {})[op] = int(n)
        return out

    def stage_seconds(self) -> dict[str, float]:
        """Wall seconds per stage, summed over every committed task."""
        return {s: float(v) for s, v in self._db.execute("SELECT stage, SUM(seconds) FROM timings GROUP BY stage")}
