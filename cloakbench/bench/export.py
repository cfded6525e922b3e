"""Export a results store to Parquet and CSV: one file per table, typed columns, rows in plan order.

Row tables (``cells``, ``queries``, ``cloaks``, ``adaptations``) keep the store's column types (booleans as
booleans, missing numbers as nulls in Parquet and empty fields in CSV); the bookkeeping tables (``tasks``,
``timings``, ``attempts``) come along so a reader can see what ran where and how long it took.

The store is opened read-only (see :mod:`cloakbench.bench.store`): exporting never changes it, and a file that
records no run is refused rather than turned into an empty store. CSV text cells that a spreadsheet would run
as a formula get a leading ``'`` (:func:`cloakbench.csv_safe.safe_cell`); Parquet keeps the values as stored.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloakbench.bench.store import STORE_FILE, TABLES, ResultsStore, disk_full_is_one_line
from cloakbench.cache import atomic_path, atomic_write_text
from cloakbench.csv_safe import safe_cell
from cloakbench.errors import ConfigError

if TYPE_CHECKING:  # the suite's module pulls in the registries (torch); reading a store must not
    from cloakbench.bench.suite import Suite

FORMATS = ("parquet", "csv")
BOOKKEEPING = ("tasks", "timings", "events", "attempts")
_ARROW = {"INTEGER": "int64", "REAL": "float64", "TEXT": "string", "BOOL": "bool_"}


def store_path(results: Path) -> Path:
    """The store file of a results folder, or ``results`` itself when it is not a folder."""
    return results / STORE_FILE if results.is_dir() else results


def open_store(results: Path) -> ResultsStore:
    """The store of a results folder (or the ``results.sqlite`` file itself), opened read-only; a clear error
    when it is absent, damaged, or records no run."""
    path = store_path(results)
    if not path.is_file():
        raise ConfigError(f"{results}: no results store here (expected {STORE_FILE}; run a suite into it first)")
    return ResultsStore(path, read_only=True)


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--format: unknown format(s) {unknown or [text]}; choose from {', '.join(FORMATS)}")
    return formats


def ordered_rows(store: ResultsStore, table: str, suite: Suite | None = None) -> list[dict[str, Any]]:
    """Rows of a row table (with their ``task_key``) in the suite's task order, then commit order: a run spread
    over Ray workers or resumed three times reads back in the order of one uninterrupted run. The order is the
    plan the store recorded when ``suite`` is not given (the dataset need not exist any more to export)."""
    if suite is not None:
        from cloakbench.bench.plan import plan_tasks

        keys = [t.key for t in plan_tasks(suite)]
    else:
        keys = store.get("plan") or []
    order = {k: i for i, k in enumerate(keys)}
    rows = store.rows(table, with_task=True)
    rows.sort(key=lambda r: order.get(r["task_key"], len(order)))
    return rows


def _csv_cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return safe_cell(value)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_csv_cell(r.get(c)) for c in columns])
    atomic_write_text(path, buffer.getvalue())


def _write_parquet(path: Path, rows: Sequence[dict[str, Any]], columns: dict[str, str]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise ConfigError("Parquet export needs pyarrow (pip install pyarrow)") from exc

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    schema = pa.schema([(c, getattr(pa, _ARROW[t])()) for c, t in columns.items()])
    arrays = [pa.array([clean(r.get(c)) for r in rows], type=schema.field(c).type) for c in columns]
    table = pa.Table.from_arrays(arrays, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _bookkeeping(store: ResultsStore, table: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    if table == "attempts":
        rows = [{**a, "metadata": json.dumps(a["metadata"], sort_keys=True, default=str)} for a in store.attempts()]
    else:
        rows = store.rows(table)
    kinds: dict[str, str] = {}
    for r in rows:
        for k, v in r.items():
            if v is None or k in kinds:
                continue
            kinds[k] = "REAL" if isinstance(v, float) else "INTEGER" if isinstance(v, int) else "TEXT"
    if rows:
        for k in rows[0]:
            kinds.setdefault(k, "TEXT")
    return rows, kinds


def export_store(results: Path, out_dir: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``<table>.parquet`` / ``<table>.csv`` for every table of the store into ``out_dir``."""
    written: list[Path] = []
    with open_store(results) as store:
        tables: list[tuple[str, list[dict[str, Any]], dict[str, str]]] = []
        for table, columns in TABLES.items():
            rows = ordered_rows(store, table)
            tables.append((table, rows, {"task_key": "TEXT", **columns}))
        for table in BOOKKEEPING:
            rows, kinds = _bookkeeping(store, table)
            tables.append((table, rows, kinds))
    with disk_full_is_one_line(store_path(results)):
        out_dir.mkdir(parents=True, exist_ok=True)
        for table, rows, columns in tables:
            for fmt in formats:
                path = out_dir / f"{table}.{fmt}"
                if fmt == "csv":
                    _write_csv(path, rows, list(columns))
                else:
                    _write_parquet(path, rows, columns)
                written.append(path)
    return written
