"""A stored run as pandas DataFrames: ``load_results(RUN)`` (also ``cloakbench.results(RUN)``).

:func:`load_results` reads a run folder's ``results.sqlite`` (or the file itself) read-only, as the report does
(:func:`cloakbench.reports.data.load_run`: nothing is written, a damaged file or a folder that holds no run is
one error naming it), and returns a frozen :class:`RunResults` of typed DataFrames, one per row table of the
store (:mod:`cloakbench.bench.store`):

``cells``        one row per cell of the grid: protection rate, its interval, clean accuracy, status, cost
``queries``      one row per (cell, protected query photo): prediction, rank, identified or not
``cloaks``       one row per cloaked photo: the budget it used (L-inf, L2, PSNR, SSIM, DSSIM)
``adaptations``  one row per model a countermeasure retrained
``tasks``        one row per committed task: kind, status, error, seconds, cache hits

Every frame has the same columns and dtypes whatever the run holds (an empty frame keeps them): the grid's axes
(``protocol``, ``defense``, ``recognizer``, ``countermeasure``, ``classifier``) and other names (identities,
statuses, kinds) are categoricals — the axes' categories in the order the suite lists them, so a
``pivot_table`` or ``groupby`` comes out in the author's order —, counts and seeds nullable ``Int64``, measures
``float64`` (NaN: no number), flags nullable ``boolean``, free text and ids ``string``, the task's finishing
time a UTC ``datetime64``. Rows come in the suite's task order, as ``cloakbench export`` writes them.

Nothing here imports torch: loading a stored run loads no model.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cloakbench.bench.store import TABLES, StoreError
from cloakbench.reports.data import AXES, RunData, load_run

__all__ = ["DTYPES", "RunResults", "frames_of", "load_results", "table_frame"]

AXIS_COLUMNS = frozenset(AXES) - {"seed"}
NAME_COLUMNS = frozenset(
    {"protected_identity", "identity", "predicted", "status", "kind", "subject", "training_set", "adaptation",
     "device"}
)  # fmt: skip
"""Text columns that hold a name from a small set (besides the grid's axes): categoricals, categories sorted."""

TASK_COLUMNS = {
    "task_key": "TEXT", "kind": "TEXT", "seed": "INTEGER", "subject": "TEXT", "countermeasure": "TEXT",
    "status": "TEXT", "error": "TEXT", "seconds": "REAL", "cache_hits": "INTEGER", "cache_misses": "INTEGER",
    "worker": "TEXT", "attempt_id": "INTEGER", "finished_utc": "TIME",
}  # fmt: skip
"""The ``tasks`` table's columns (the store's schema) and their kinds."""


def _dtype(column: str, kind: str) -> str:
    if kind == "INTEGER":
        return "Int64"
    if kind == "REAL":
        return "float64"
    if kind == "BOOL":
        return "boolean"
    if kind == "TIME":
        return "datetime64[ns, UTC]"
    return "category" if column in AXIS_COLUMNS or column in NAME_COLUMNS else "string"


DTYPES: Mapping[str, Mapping[str, str]] = {
    **{
        table: {"task_key": "string", **{c: _dtype(c, k) for c, k in columns.items()}}
        for table, columns in TABLES.items()
    },
    "tasks": {c: _dtype(c, k) for c, k in TASK_COLUMNS.items()},
}
"""table -> column -> pandas dtype of every frame :class:`RunResults` holds."""


@dataclass(frozen=True, kw_only=True, eq=False)
class RunResults:
    """A stored run's tables as typed DataFrames (see the module's docstring), with the suite it ran.

    The frames are the caller's to read; change a copy (``results.cells.copy()``), not them."""

    source: Path
    suite: Mapping[str, Any]
    cells: pd.DataFrame
    queries: pd.DataFrame
    cloaks: pd.DataFrame
    adaptations: pd.DataFrame
    tasks: pd.DataFrame

    @property
    def name(self) -> str:
        """The suite's name."""
        return str(self.suite.get("name", ""))

    @property
    def ok_cells(self) -> pd.DataFrame:
        """The cells whose status is ``ok`` (a refused or failed cell holds no protection rate)."""
        return self.cells[self.cells["status"] == "ok"]


def _categories(data: RunData, column: str, values: pd.Series) -> list[str]:
    present = [str(v) for v in values.dropna().unique()]
    if column in AXIS_COLUMNS:
        return data.present(column, present)
    return sorted(present)


def _frame(data: RunData, table: str, rows: tuple[dict[str, Any], ...]) -> pd.DataFrame:
    dtypes = DTYPES[table]
    raw = pd.DataFrame.from_records(list(rows), columns=list(dtypes))
    out: dict[str, pd.Series] = {}
    for column, dtype in dtypes.items():
        values = raw[column]
        try:
            if dtype == "category":
                categories = _categories(data, column, values)
                out[column] = pd.Series(pd.Categorical(values.astype("string"), categories=categories), name=column)
            elif dtype.startswith("datetime64"):
                out[column] = pd.to_datetime(values, utc=True, format="ISO8601").astype(dtype)
            elif dtype == "float64":
                out[column] = pd.to_numeric(values.astype(object).where(values.notna(), float("nan"))).astype(dtype)
            else:
                out[column] = values.astype(object).where(values.notna(), None).astype(dtype)
        except (TypeError, ValueError) as exc:
            raise StoreError(
                f"{data.source}: table {table}, column {column} cannot be read as {dtype} ({exc}); the store is "
                "damaged or was edited"
            ) from exc
    return pd.DataFrame(out, index=pd.RangeIndex(len(raw)))


def table_frame(data: RunData, table: str) -> pd.DataFrame:
    """One table (``cells``, ``queries``, ``cloaks``, ``adaptations`` or ``tasks``) of a run already read by
    :func:`cloakbench.reports.data.load_run`, as :class:`RunResults` holds it (the report's tables use this on the
    :class:`RunData` they are given)."""
    if table not in DTYPES:
        raise KeyError(f"no table {table!r}; the tables are {', '.join(DTYPES)}")
    rows: tuple[dict[str, Any], ...] = getattr(data, table)
    return _frame(data, table, rows)


def frames_of(data: RunData) -> RunResults:
    """Every table of a run already read by :func:`cloakbench.reports.data.load_run` as DataFrames."""
    return RunResults(source=data.source, suite=data.suite, **{table: table_frame(data, table) for table in DTYPES})


def load_results(run_dir: Path | str) -> RunResults:
    """The run stored in ``run_dir`` (a results folder or its ``results.sqlite``), read-only, as typed DataFrames.

    Raises :class:`~cloakbench.errors.ConfigError` naming ``run_dir`` when it holds no results store or no
    finished task, and :class:`~cloakbench.bench.store.StoreError` naming the file when the store is damaged."""
    return frames_of(load_run(Path(run_dir)))


class _CallableModule(types.ModuleType):
    """This module, callable: ``cloakbench.results(RUN)`` is :func:`load_results` (the module keeps its name, so
    ``from cloakbench.results import load_results`` works as well)."""

    def __call__(self, run_dir: Path | str) -> RunResults:
        return load_results(run_dir)


sys.modules[__name__].__class__ = _CallableModule
