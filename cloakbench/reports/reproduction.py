"""Reproducing the literature: a run's headline numbers, stored and checked, beside the published ones.

``headline(data)`` reduces a stored run to its protection rate per cell (seeds pooled), with the number of
query photos behind each; ``scripts/reproduce.py --update`` writes it to ``docs/reproduction/<suite>.json``,
and ``tests/test_reproduction.py`` re-runs the suite and checks every cell against that file with
:func:`compare`. The tolerance is counted in query photos (a rate over 6 photos moves in steps of 1/6), so a
cell passes when its rate is within ``photos`` photos of the stored one: another CPU or library build may
flip a photo that sits on a decision boundary, a real regression flips many.

:data:`PUBLISHED` holds the published numbers (FaceCure's README on FaceScrub, the Fawkes and LowKey papers)
that ``docs/reproduction.md`` sets beside ours.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloakbench.reports.data import RunData
from cloakbench.reports.render import Column, Estimate, Table
from cloakbench.reports.summaries import CELL, pooled_cells

HEADLINE_VERSION = 1


def cell_key(row: Mapping[str, Any]) -> str:
    return "/".join(str(row[k]) for k in CELL)


def headline(data: RunData) -> dict[str, Any]:
    """The run's protection rate per cell (ok cells; others with their status), JSON-ready."""
    cells: dict[str, dict[str, Any]] = {}
    for row in pooled_cells(data):
        est = row["protection"]
        value = est.value if isinstance(est, Estimate) else float("nan")
        entry: dict[str, Any] = {"status": row["status"], "queries": int(row["n_queries"])}
        if row["status"] == "ok" and not math.isnan(value):
            entry.update(protection=round(value, 6), ci=[round(est.low, 6), round(est.high, 6)])
            clean = row.get("clean_accuracy_protected")
            if isinstance(clean, float) and not math.isnan(clean):
                entry["clean_accuracy"] = round(clean, 6)
        cells[cell_key(row)] = entry
    return {"version": HEADLINE_VERSION, "suite": data.name, "config": portable_config(data.suite), "cells": cells}


def portable_config(suite: Mapping[str, Any]) -> dict[str, Any]:
    """The stored suite without what depends on the checkout: the dataset folder by its name only."""
    config: dict[str, Any] = json.loads(json.dumps(suite))
    dataset = config.get("dataset") or {}
    for key in ("path", "names"):
        if dataset.get(key):
            dataset[key] = Path(str(dataset[key])).name
    return config


def compare(stored: Mapping[str, Any], fresh: Mapping[str, Any], *, photos: int = 1) -> list[str]:
    """Differences between two headlines beyond ``photos`` query photos per cell, as readable lines (empty:
    they agree). A cell missing on either side, or ok on one side only, is a difference."""
    problems = []
    old, new = stored.get("config") or {}, fresh.get("config") or {}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        problems.append(
            f"the suite changed since the numbers were stored (keys: {', '.join(changed)}); regenerate them with "
            "scripts/reproduce.py --update"
        )
    a, b = stored.get("cells", {}), fresh.get("cells", {})
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            problems.append(f"{key}: {'not in the stored numbers' if key not in a else 'missing from this run'}")
            continue
        x, y = a[key], b[key]
        if ("protection" in x) != ("protection" in y):
            problems.append(f"{key}: status {y['status']!r}, stored {x['status']!r}")
            continue
        if "protection" not in x:
            continue
        n = max(int(y.get("queries") or 0), 1)
        tolerance = photos / n + 1e-9
        if abs(float(x["protection"]) - float(y["protection"])) > tolerance:
            problems.append(
                f"{key}: protection {y['protection']:.3f}, stored {x['protection']:.3f} "
                f"(tolerance {photos} of {n} photos = {tolerance:.3f})"
            )
    return problems


@dataclass(frozen=True, kw_only=True)
class Published:
    """One published protection rate: where it comes from and the setting it was measured in."""

    source: str
    defense: str
    tracker: str
    protection: float
    setting: str
    ours: str | None = None
    """The cell of our suites that measures the same thing (``protocol/defense/recognizer/countermeasure/
    classifier``; SFace stands in for the defense's own extractor, FaceNet-MSCeleb for an oblivious model),
    None where we have no counterpart."""


_FAWKES_NN = "poisoning/fawkes-v1-high/sface/none/nearest-neighbour"
_LOWKEY_NN = "poisoning/lowkey/sface/none/nearest-neighbour"

PUBLISHED: tuple[Published, ...] = (
    Published(source="FaceCure README", defense="Fawkes v1.0 high", tracker="baseline NN", protection=0.97,
              setting="FaceScrub, one user", ours=_FAWKES_NN),
    Published(source="FaceCure README", defense="Fawkes v1.0 high", tracker="end-to-end", protection=0.88,
              setting="FaceScrub, one user", ours="poisoning/fawkes-v1-high/sface/end-to-end/softmax"),
    Published(source="FaceCure README", defense="Fawkes v1.0 high", tracker="oblivious (MagFace)", protection=0.00,
              setting="FaceScrub, one user", ours="poisoning/fawkes-v1-high/facenet-msceleb/none/nearest-neighbour"),
    Published(source="FaceCure README", defense="Fawkes v1.0 high", tracker="adaptive NN", protection=0.03,
              setting="FaceScrub, one user", ours="poisoning/fawkes-v1-high/sface/adaptive/nearest-neighbour"),
    Published(source="FaceCure README", defense="Fawkes v1.0 high", tracker="adaptive end-to-end", protection=0.03,
              setting="FaceScrub, one user"),
    Published(source="FaceCure README", defense="LowKey", tracker="baseline NN", protection=0.94,
              setting="FaceScrub, one user", ours=_LOWKEY_NN),
    Published(source="FaceCure README", defense="LowKey", tracker="end-to-end", protection=0.97,
              setting="FaceScrub, one user", ours="poisoning/lowkey/sface/end-to-end/softmax"),
    Published(source="FaceCure README", defense="LowKey", tracker="oblivious (MagFace)", protection=1.00,
              setting="FaceScrub, one user", ours="poisoning/lowkey/facenet-msceleb/none/nearest-neighbour"),
    Published(source="FaceCure README", defense="LowKey", tracker="oblivious (CLIP)", protection=0.24,
              setting="FaceScrub, one user"),
    Published(source="FaceCure README", defense="LowKey", tracker="adaptive", protection=0.03,
              setting="FaceScrub, one user", ours="poisoning/lowkey/sface/adaptive/nearest-neighbour"),
    Published(source="Fawkes paper (USENIX Security 2020)", defense="Fawkes", tracker="trained on cloaks",
              protection=0.95, setting="'95%+', every user photo cloaked", ours=_FAWKES_NN),
    Published(source="Fawkes paper (USENIX Security 2020)", defense="Fawkes", tracker="with leaked clean photos",
              protection=0.80, setting="'80%+' when some clean photos leak",
              ours="poisoning/fawkes-v1-high-half/sface/none/nearest-neighbour"),
    Published(source="Fawkes paper (USENIX Security 2020)", defense="Fawkes (robust)",
              tracker="Rekognition", protection=1.00, setting="commercial API, 2020 ('100% effective')",
              ours="poisoning/fawkes-v1-high/rekognition-msceleb/none/service"),
    Published(source="Fawkes paper (USENIX Security 2020)", defense="Fawkes (robust)",
              tracker="Azure Face", protection=1.00, setting="commercial API, 2020 ('100% effective')",
              ours="poisoning/fawkes-v1-high/azure-dlib/none/service"),
    Published(source="LowKey paper (ICLR 2021)", defense="LowKey", tracker="Rekognition (rank-1)",
              protection=0.99, setting="'accuracy below 1%', gallery cloaked, clean probes",
              ours="evasion/lowkey/rekognition-msceleb/none/service-search"),
    Published(source="LowKey paper (ICLR 2021)", defense="LowKey", tracker="Rekognition (rank-1)",
              protection=0.99, setting="'accuracy below 1%', gallery cloaked, clean probes",
              ours="evasion/lowkey/rekognition-dlib/none/service-search"),
    Published(source="LowKey paper (ICLR 2021)", defense="LowKey", tracker="Azure Face (rank-1)",
              protection=0.99, setting="'accuracy below 1%', gallery cloaked, clean probes"),
)  # fmt: skip


def side_by_side(runs: Mapping[str, Mapping[str, Any]]) -> Table:
    """Published numbers next to ours: one column per run (its headline, by suite name), '–' where a run has no
    such cell."""
    names = list(runs)
    rows = []
    for p in PUBLISHED:
        row: dict[str, Any] = {
            "source": p.source, "defense": p.defense, "tracker": p.tracker, "published": p.protection,
            "ours": p.ours or "no counterpart",
        }  # fmt: skip
        for i, name in enumerate(names):
            cell = (runs[name].get("cells") or {}).get(p.ours or "", {})
            if "protection" in cell:
                lo, hi = cell.get("ci", [float("nan"), float("nan")])
                row[f"run{i}"] = Estimate(float(cell["protection"]), float(lo), float(hi))
        rows.append(row)
    return Table(
        name="side-by-side",
        title="Published protection rates and ours",
        caption=(
            "Published: FaceCure's README (FaceScrub, one user), the Fawkes and LowKey papers. Ours: the cell named "
            "in 'our cell' (protocol/defense/recognizer/countermeasure/classifier) of each run, with its 95% "
            "bootstrap interval; SFace stands in for the defense's own extractor, FaceNet-MSCeleb for an oblivious "
            "model, the Rekognition-like (on FaceNet-MSCeleb or dlib ResNet) and Azure-like (on dlib ResNet) APIs over "
            "HTTP for the commercial services (enrolling the cloaked photos for Fawkes, searching a cloaked gallery "
            "for LowKey)."
        ),
        columns=(
            Column(key="source", header="source", numeric=False),
            Column(key="defense", header="defense", numeric=False),
            Column(key="tracker", header="tracker", numeric=False),
            Column(key="published", header="published"),
            Column(key="ours", header="our cell", numeric=False),
            *(Column(key=f"run{i}", header=name) for i, name in enumerate(names)),
        ),
        rows=tuple(rows),
    )
