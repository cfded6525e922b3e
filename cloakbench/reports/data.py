"""What a report reads: everything stored in a results folder, loaded once, with no model, dataset or suite file.

:func:`load_run` reads ``<run>/results.sqlite`` (or the file itself) into a frozen :class:`RunData`; every
table and figure is a pure function of it. Nothing here imports torch: a report on a stored run loads no
model and touches no cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloakbench.bench.export import open_store, ordered_rows
from cloakbench.errors import ConfigError

AXES = ("seed", "protocol", "defense", "recognizer", "countermeasure", "classifier")


@dataclass(frozen=True, kw_only=True)
class RunData:
    """A stored run: the suite it ran (as stored), its rows in plan order, and its bookkeeping."""

    source: Path
    suite: Mapping[str, Any]
    suite_digest: str
    created_utc: str
    cells: tuple[dict[str, Any], ...]
    queries: tuple[dict[str, Any], ...]
    cloaks: tuple[dict[str, Any], ...]
    adaptations: tuple[dict[str, Any], ...]
    tasks: tuple[dict[str, Any], ...]
    timings: tuple[dict[str, Any], ...]
    attempts: tuple[dict[str, Any], ...]
    grids: Mapping[str, np.ndarray] = field(default_factory=dict)
    plan: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return str(self.suite.get("name", ""))

    def order(self, axis: str) -> dict[str, int]:
        """Position of each value of a grid axis in the suite (labels for defenses and countermeasures), so tables
        and figures follow the order the author wrote; values the suite does not list sort last."""
        suite = self.suite
        values: Sequence[Any]
        if axis == "seed":
            values = suite.get("seeds", [])
        elif axis == "protocol":
            values = suite.get("protocols", [])
        elif axis in ("defense", "countermeasure"):
            values = [d.get("label") or d.get("name") for d in suite.get(f"{axis}s", [])]
        elif axis == "recognizer":
            services = [s.get("label") or s.get("kind") for s in suite.get("services", [])]
            values = [*suite.get("recognizers", []), *services]
        elif axis == "classifier":
            values = suite.get("classifiers", [])
        else:
            raise KeyError(axis)
        return {str(v): i for i, v in enumerate(values)}

    def present(self, axis: str, values: Iterable[str]) -> list[str]:
        """The distinct ``values`` of a grid axis in suite order (values the suite does not list last, by name)."""
        order = self.order(axis)
        return sorted(set(values), key=lambda v: (order.get(v, len(order)), v))

    def first(self, axis: str, values: Iterable[str], *, prefer: str | None = None) -> str | None:
        """The first of ``values`` in suite order; with ``prefer``, the first whose spec has that registry name
        (``prefer="none"``: the no-countermeasure entry) when there is one."""
        present = self.present(axis, values)
        if prefer is not None:
            for v in present:
                if self.spec(axis, v).get("name") == prefer:
                    return v
        return present[0] if present else None

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices the run's attempts used (from their metadata), sorted."""
        return tuple(sorted({str((a.get("metadata") or {}).get("device") or "") for a in self.attempts} - {""}))

    def spec(self, axis: str, label: str) -> Mapping[str, Any]:
        """The stored spec (name, label, params, ...) of a defense or countermeasure label; empty if unknown."""
        for item in self.suite.get(f"{axis}s", []):
            if (item.get("label") or item.get("name")) == label:
                return dict(item)
        return {}

    def sort(self, rows: Sequence[Mapping[str, Any]], axes: Sequence[str] = AXES) -> list[dict[str, Any]]:
        orders = {a: self.order(a) for a in axes}
        return sorted(
            (dict(r) for r in rows),
            key=lambda r: tuple(orders[a].get(str(r.get(a, "")), len(orders[a])) for a in axes),
        )


def load_run(results: Path) -> RunData:
    """Read a results folder (or its ``results.sqlite``); a clear error when it holds no finished task."""
    with open_store(results) as store:
        suite = store.get("suite")
        if not isinstance(suite, dict):
            raise ConfigError(f"{results}: the results store records no suite (was a run ever started here?)")
        tables = {t: tuple(r for r in ordered_rows(store, t)) for t in ("cells", "queries", "cloaks", "adaptations")}
        data = RunData(
            source=results,
            suite=suite,
            suite_digest=str(store.get("suite_digest") or ""),
            created_utc=str(store.get("created_utc") or ""),
            cells=tables["cells"],
            queries=tables["queries"],
            cloaks=tables["cloaks"],
            adaptations=tables["adaptations"],
            tasks=tuple(store.rows("tasks")),
            timings=tuple(store.rows("timings")),
            attempts=tuple(store.attempts()),
            grids=store.grids(),
            plan=tuple(store.get("plan") or ()),
        )
    if not data.tasks:
        raise ConfigError(f"{results}: the results store holds no finished task yet; nothing to report")
    return data


def suite_yaml(data: RunData) -> str:
    """The stored suite as YAML (what the run was asked to do, every default filled in)."""
    import yaml

    return str(yaml.safe_dump(json.loads(json.dumps(data.suite)), sort_keys=False, allow_unicode=True))
