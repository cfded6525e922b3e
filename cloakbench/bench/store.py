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

Readers (``report``, ``export``) open the file read-only (``mode=ro``: no schema is created, the journal mode is
left alone, and a file that records no run stays as it was; on a WAL store SQLite may leave empty ``-wal`` and
``-shm`` files beside it, and on a read-only file system a checkpointed store is read as immutable). Every
opening runs SQLite's ``quick_check``, so a truncated, overwritten or foreign file is refused before a row is
read, and any SQLite error (damage, a full disk, a lock) becomes one :class:`StoreError` line that names the file
and says what to do. The store is not authenticated (SQLite has no checksums): reading checks what a stored
value can be — its column's type, a rate within [0, 1], a grid that is a PNG of sensible size, a run value that
is JSON — but a plausible value edited with valid SQL, or bytes changed inside a record, reads back as it is.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import io
import json
import math
import os
import re
import socket
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
from PIL import Image

from cloakbench.errors import CloakbenchError, ConfigError
from cloakbench.png import decode_png, encode_png

STORE_FILE = "results.sqlite"
SCHEMA_VERSION = 1
REFUSED_REQUESTS = "refused_requests"
"""The ``service_usage`` operation under which a service task records how many requests its HTTP server refused
(no secret, a foreign Host, not JSON): not a query, a sign that something outside the run tried to reach it."""

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


# Columns that hold a rate or an accuracy: a stored value outside [0, 1] is damage or an edit, never a result.
RATE_COLUMNS = frozenset(
    {"protection_rate", "ci_low", "ci_high", "protection_rate_identity_mean", "top5_accuracy", "top50_accuracy",
     "clean_accuracy_protected", "clean_accuracy_all", "clean_accuracy_before", "clean_accuracy_after",
     "final_train_accuracy"}
)  # fmt: skip
MAX_GRID_PIXELS = 4096 * 4096  # a grid shows a few 112x112 faces; a larger image in the store is not one of ours
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode(value: Any, kind: str, column: str) -> Any:
    """A stored value as the row holds it; ``ValueError`` when its type or range cannot be one cloakbench wrote
    (the store is not authenticated: a damaged or edited file must not become a number in a report)."""
    if value is None:
        return float("nan") if column in NAN_COLUMNS else None
    if kind == "BOOL":
        if type(value) is not int or value not in (0, 1):
            raise ValueError(f"{value!r} is not a stored boolean")
        return bool(value)
    if kind == "INTEGER" and type(value) is not int:
        raise ValueError(f"{value!r} is not an integer")
    if kind == "TEXT" and not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    if kind == "REAL":
        if type(value) not in (int, float):
            raise ValueError(f"{value!r} is not a number")  # +inf is one: the PSNR of an unchanged photo
        if column in RATE_COLUMNS and not -1e-9 <= value <= 1.0 + 1e-9:
            raise ValueError(f"{value!r} is not a rate in [0, 1]")
    return value


class StoreError(CloakbenchError):
    """The results store (or an output written from it) cannot be used: damaged or not a store, no run recorded,
    a full disk, a lock held too long. The message is one line naming the file and what to do."""


def store_error(path: Path, exc: sqlite3.Error, *, opening: bool = False) -> StoreError:
    """One line for an SQLite error on ``path``: damage, a full disk (the transaction was rolled back), or else.
    ``opening``: it happened while the file was being opened and checked (nothing was written to it)."""
    code = str(getattr(exc, "sqlite_errorname", ""))  # Python >= 3.11; the message says the same on 3.10
    text = str(exc)
    if code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return damaged_store(path, text, opening=opening)
    if code.startswith("SQLITE_FULL") or "disk is full" in text:
        return StoreError(
            f"{path}: the disk is full (sqlite: {text}); the unfinished transaction was rolled back, so the results "
            "store is intact and keeps every task finished before; free some space and run the same command again"
        )
    return StoreError(f"{path}: cannot use the results store (sqlite: {text})")


def damaged_store(path: Path, detail: str, *, opening: bool) -> StoreError:
    left = "it was left as it is; " if opening else ""
    return StoreError(
        f"{path}: not a cloakbench results store, or it is damaged (sqlite: {detail}); {left}the run folder's CSV "
        "files are kept, and `cloakbench run SUITE --out FOLDER --fresh` discards this store and starts the run over"
    )


def no_run(path: Path) -> StoreError:
    return StoreError(
        f"{path}: the file records no run (not a cloakbench results store, or no suite was ever run into it); "
        "nothing was read from it or written to it"
    )


F = TypeVar("F", bound=Callable[..., Any])


def _sqlite_errors(method: F) -> F:
    """A store method whose SQLite errors become one :class:`StoreError` line naming the store's file."""

    @functools.wraps(method)
    def wrapper(self: SqliteFile, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc

    return cast(F, wrapper)


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")  # cloakbench.cache.atomic_path's names


@contextlib.contextmanager
def disk_full_is_one_line(store: Path) -> Iterator[None]:
    """Writing files from the results store ``store``: a full disk (ENOSPC, EDQUOT) becomes one StoreError line
    naming the file. Every output is written to a temporary file and renamed onto its name (see
    :func:`cloakbench.cache.atomic_path`), so the file keeps its previous content; the store is only read."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left on device" not in str(exc):
            raise
        where = "an output file"
        if exc.filename:
            name = Path(os.fsdecode(exc.filename))
            match = _TEMPORARY.match(name.name)
            where = str(name.with_name(match["name"]) if match else name)
        raise StoreError(
            f"the disk is full while writing {where} ({exc.strerror or exc}); files are replaced whole, so it keeps "
            f"its previous content, and the results store {store} is intact with every finished result; free some "
            "space and run the same command again"
        ) from exc


def _connect(path: Path, *, read_only: bool, timeout_s: float) -> sqlite3.Connection:
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    uri = path.resolve().as_uri()  # percent-encoded: '?' or '#' in a folder name stays part of the path
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout_s, isolation_level=None)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        code, text = str(getattr(exc, "sqlite_errorname", "")), str(exc)
        unwritable = code.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")) or "readonly" in text or "open" in text
        if not unwritable or path.with_name(f"{path.name}-wal").exists():
            db.close()
            raise
        # A WAL store in a folder this process cannot write or on a read-only file system (an archived run):
        # SQLite cannot create the shared-memory file a WAL reader needs. With no -wal file every commit is in
        # the main file, so read it as an immutable file (no locks, no side files). Only a writer of another user
        # starting while this reads could change it under the reader.
        db.close()
        db = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=timeout_s, isolation_level=None)
    return db


S = TypeVar("S", bound="SqliteFile")


class SqliteFile:
    """An SQLite file opened for one process: WAL journal, a busy timeout (a second writer waits), explicit
    ``BEGIN IMMEDIATE`` transactions. The results store and the bench tables share it.

    ``read_only``: opened with ``mode=ro`` for readers; the journal mode and every byte of the file are left as
    they are. Either way the file must pass ``PRAGMA quick_check`` (page structure) before anything else."""

    def __init__(self, path: Path, *, timeout_s: float = 120.0, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        db: sqlite3.Connection | None = None
        try:
            db = _connect(path, read_only=read_only, timeout_s=timeout_s)
            db.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            problems = [str(r[0]) for r in db.execute("PRAGMA quick_check(3)").fetchall()]
            if problems != ["ok"]:
                raise damaged_store(path, f"quick_check: {'; '.join(problems)}", opening=True)
            if not read_only:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # with WAL: a killed process never loses a commit
        except BaseException as exc:
            if db is not None:
                db.close()
            if isinstance(exc, sqlite3.Error):
                raise store_error(path, exc, opening=True) from exc
            raise
        self._db = db

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
            self._db.execute("COMMIT")  # may fail too (a full disk): then the whole transaction is undone
        except BaseException:
            if self._db.in_transaction:  # SQLite may have rolled back already (it does on some errors)
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise


class ResultsStore(SqliteFile):
    """The SQLite results store of one results folder. Open one per process (connections are not shared).

    ``read_only=True`` (readers): nothing is created or written, and a file that records no suite is refused."""

    def __init__(self, path: Path, *, timeout_s: float = 120.0, read_only: bool = False) -> None:
        super().__init__(path, timeout_s=timeout_s, read_only=read_only)
        try:
            self._open(read_only)
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise store_error(path, exc, opening=True) from exc
            raise

    def _open(self, read_only: bool) -> None:
        if read_only:
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "run" not in tables or self.get("suite") is None:
                raise no_run(self.path)
        else:
            with self._transaction() as db:
                for statement in _schema().split(";\n"):
                    db.execute(statement)
                db.execute("INSERT OR IGNORE INTO run VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = self.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"{self.path}: results store schema version {version}, this cloakbench reads {SCHEMA_VERSION}"
            )

    @classmethod
    def in_folder(cls, folder: Path) -> ResultsStore:
        return cls(folder / STORE_FILE)

    # -- the run: which suite this folder holds, and every attempt at it --------------------------------

    @_sqlite_errors
    def get(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM run WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._json(row[0], f"run key {key!r}")

    def _json(self, text: Any, where: str) -> Any:
        try:
            return json.loads(text)
        except (TypeError, ValueError) as exc:
            raise StoreError(
                f"{self.path}: {where} holds no JSON value ({exc}); the store is damaged or was edited"
            ) from exc

    @_sqlite_errors
    def put(self, key: str, value: Any) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO run VALUES (?, ?)", (key, json.dumps(value, default=str)))

    @_sqlite_errors
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

    @_sqlite_errors
    def start_attempt(self, *, executor: str, metadata: Mapping[str, Any]) -> int:
        with self._transaction() as db:
            cur = db.execute(
                "INSERT INTO attempts (started_utc, status, executor, host, pid, metadata) VALUES (?, ?, ?, ?, ?, ?)",
                (utc_now(), "running", executor, socket.gethostname(), os.getpid(), json.dumps(metadata, default=str)),
            )
            assert cur.lastrowid is not None
            return int(cur.lastrowid)

    @_sqlite_errors
    def finish_attempt(self, attempt: int, *, status: str, metadata: Mapping[str, Any] | None = None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE attempts SET finished_utc = ?, status = ? WHERE id = ?", (utc_now(), status, attempt))
            if metadata is not None:
                db.execute(
                    "UPDATE attempts SET metadata = ? WHERE id = ?", (json.dumps(metadata, default=str), attempt)
                )

    @_sqlite_errors
    def attempts(self) -> list[dict[str, Any]]:
        cur = self._db.execute("SELECT * FROM attempts ORDER BY id")
        names = [d[0] for d in cur.description]
        return [
            {**dict(zip(names, r, strict=True)), "metadata": self._json(r[names.index("metadata")], f"attempt {r[0]}")}
            for r in cur.fetchall()
        ]

    # -- tasks -------------------------------------------------------------------------------------------

    @_sqlite_errors
    def task_states(self) -> dict[str, str]:
        """task key -> status (ok / failed) of every committed task."""
        return dict(self._db.execute("SELECT task_key, status FROM tasks").fetchall())

    @_sqlite_errors
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

    @_sqlite_errors
    def rows(self, table: str, *, with_task: bool = False) -> list[dict[str, Any]]:
        """Every row of a row table, in commit order; failed cells keep only their key, status and note."""
        if table in TABLES:
            columns = TABLES[table]
            cur = self._db.execute(f"SELECT task_key, * FROM {table} ORDER BY rowid")
            names = [d[0] for d in cur.description]
            out = []
            for r in cur.fetchall():
                values = dict(zip(names[1:], r[1:], strict=True))
                row = {}
                for c in columns:
                    try:
                        row[c] = _decode(values[c], columns[c], c)
                    except ValueError as exc:
                        raise StoreError(
                            f"{self.path}: table {table}, column {c} of task {r[0]!r}: {exc}; the store is damaged or "
                            "was edited, and none of it is reported"
                        ) from exc
                if with_task:
                    row = {"task_key": r[0], **row}
                out.append(row)
            return out
        cur = self._db.execute(f"SELECT * FROM {table} ORDER BY rowid")  # tasks, timings, service_usage, attempts
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    @_sqlite_errors
    def grids(self) -> dict[str, np.ndarray]:
        return {label: self._grid(label, blob) for label, blob in self._db.execute("SELECT defense, png FROM grids")}

    def _grid(self, label: Any, blob: Any) -> np.ndarray:
        """A stored grid image: only a PNG of a sensible size is decoded (Pillow would open any format it knows)."""
        problem = ""
        if not isinstance(blob, bytes) or not blob.startswith(PNG_SIGNATURE):
            problem = "not a PNG image"
        else:
            try:
                with Image.open(io.BytesIO(blob), formats=["PNG"]) as img:
                    width, height = img.size
                if width * height > MAX_GRID_PIXELS:
                    problem = f"{width}x{height} pixels, more than any grid"
                else:
                    return decode_png(blob)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                problem = f"an unreadable PNG ({exc})"
        raise StoreError(f"{self.path}: the grid of {label!r} is {problem}; the store is damaged or was edited")

    @_sqlite_errors
    def service_usage(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for key, op, n in self._db.execute("SELECT task_key, operation, count FROM service_usage ORDER BY rowid"):
            out.setdefault(key, {})[op] = int(n)
        return out

    @_sqlite_errors
    def refused_requests(self) -> dict[str, int]:
        """task key -> requests its service's HTTP server refused, for every HTTP service task (0: none)."""
        cur = self._db.execute(
            "SELECT task_key, count FROM service_usage WHERE operation = ? ORDER BY rowid", (REFUSED_REQUESTS,)
        )
        return {key: int(n) for key, n in cur}

    @_sqlite_errors
    def stage_seconds(self) -> dict[str, float]:
        """Wall seconds per stage, summed over every committed task."""
        return {s: float(v) for s, v in self._db.execute("SELECT stage, SUM(seconds) FROM timings GROUP BY stage")}
