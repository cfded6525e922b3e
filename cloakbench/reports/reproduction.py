"""Reproducing the literature: a run's headline numbers, stored and checked, beside the published ones.

``headline(data)`` reduces a stored run to its protection rate per cell (seeds pooled), with the number of
query photos behind each; ``scripts/reproduce.py --update`` writes it to ``docs/reproduction/<suite>.json``,
and ``tests/test_reproduction.py`` re-runs the suite and checks every cell against that file with
:func:`compare`. The tolerance is counted in query photos, and compared as whole numbers of photos (the count
of protected photos, stored beside the rounded rate), so a cell passes when at most ``photos`` of its photos
changed outcome: another CPU or library build may flip a photo that sits on a decision boundary, a real
regression flips many. Each stored headline also records the machine that made it (CPU and torch's CPU
capability, GPU, torch version, commit), since that is what a one-photo difference usually comes from.

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

HEADLINE_VERSION = 2  # 2: protected-photo counts and the machine

MACHINE_KEYS = ("cpu", "torch_cpu_capability", "cpu_count", "device", "gpu_name", "torch_version", "tf32_matmul",
                "tf32_cudnn", "cudnn_deterministic")  # fmt: skip


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
            protected = round(value * int(row["n_queries"]))
            entry.update(protection=round(value, 6), protected=protected, ci=[round(est.low, 6), round(est.high, 6)])
            clean = row.get("clean_accuracy_protected")
            if isinstance(clean, float) and not math.isnan(clean):
                entry["clean_accuracy"] = round(clean, 6)
        cells[cell_key(row)] = entry
    return {
        "version": HEADLINE_VERSION, "suite": data.name, "config": portable_config(data.suite),
        "machines": machines(data), "cells": cells,
    }  # fmt: skip


def machines(data: RunData) -> list[dict[str, Any]]:
    """The machines the run's attempts ran on (what moves a photo across a decision boundary), with the commit
    of cloakbench each used; one entry per distinct machine."""
    out: list[dict[str, Any]] = []
    for attempt in data.attempts:
        meta = attempt.get("metadata") or {}
        entry = {k: meta.get(k) for k in MACHINE_KEYS if meta.get(k) is not None}
        entry["torch_version"] = entry.get("torch_version") or (meta.get("packages") or {}).get("torch")
        git = meta.get("git") or {}
        entry["commit"] = git.get("commit")
        entry["dirty"] = git.get("dirty")
        if entry not in out:
            out.append(entry)
    return out


def protected_photos(cell: Mapping[str, Any]) -> int:
    """How many of a stored cell's query photos were protected: the stored count, or (older headlines) the
    rounded rate times the photos, which is exact because the rate is a count over ``queries``."""
    if "protected" in cell:
        return int(cell["protected"])
    return round(float(cell["protection"]) * int(cell.get("queries") or 0))


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
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))  # the machine is not the suite
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
        n = int(y.get("queries") or 0)
        if int(x.get("queries") or 0) != n:
            problems.append(f"{key}: {n} query photos, stored {x.get('queries')}")
            continue
        moved = abs(protected_photos(x) - protected_photos(y))
        if moved > photos:
            problems.append(
                f"{key}: protection {y['protection']:.3f}, stored {x['protection']:.3f} "
                f"({moved} of {n} photos changed outcome; tolerance {photos})"
            )
    return problems


@dataclass(frozen=True, kw_only=True)
class Published:
    """One published protection rate: where it comes from, the setting it was measured in, the cell of ours that
    measures the same thing and why that cell (one line, shown in the side-by-side table)."""

    source: str
    defense: str
    tracker: str
    protection: float
    setting: str
    ours: str | None = None
    """The cell of our suites that measures the same thing (``protocol/defense/recognizer/countermeasure/
    classifier``), None where we have no counterpart."""
    why: str
    """Why ``ours`` is that cell (or why there is none)."""


_FC = "FaceCure README (ftramer/FaceCure@35cef5193965)"
_FAWKES_PAPER = "Fawkes paper (USENIX Security 2020)"
_LOWKEY_PAPER = "LowKey paper (ICLR 2021)"
_FAWKES_NN = "poisoning/fawkes-v1-high/sface/none/nearest-neighbour"
_LOWKEY_NN = "poisoning/lowkey/sface/none/nearest-neighbour"
_WHITE_BOX = "SFace, one of the two surrogates the cloak was made on, plays the defense's own extractor"
_OBLIVIOUS = "FaceNet-MSCeleb had no part in making the cloak, as MagFace had none in FaceCure's"

PUBLISHED: tuple[Published, ...] = (
    Published(source=_FC, defense="Fawkes v1.0 high", tracker="baseline NN (Fawkes 0.3 extractor)", protection=0.97,
              setting="FaceScrub, one user", ours=_FAWKES_NN,
              why="FaceCure's baseline extractor is Fawkes 0.3's, from the cloak's authors but not one v1.0 "
              "optimised on; we have no such near-surrogate, so the white-box SFace NN is the upper end"),
    Published(source=_FC, defense="Fawkes v1.0 high", tracker="Fawkes v1.0 extractor (NN)", protection=1.00,
              setting="FaceScrub, one user", ours=_FAWKES_NN,
              why=_WHITE_BOX),
    Published(source=_FC, defense="Fawkes v1.0 high", tracker="end-to-end", protection=0.88,
              setting="FaceScrub, one user", ours="poisoning/fawkes-v1-high/sface/end-to-end/softmax",
              why="FaceCure's end-to-end recipe (`end-to-end`) on the white-box extractor, scored by its softmax"),
    Published(source=_FC, defense="Fawkes v1.0 high", tracker="oblivious (MagFace)", protection=0.00,
              setting="FaceScrub, one user", ours="poisoning/fawkes-v1-high/facenet-msceleb/none/nearest-neighbour",
              why=_OBLIVIOUS),
    Published(source=_FC, defense="Fawkes v1.0 high", tracker="adaptive NN", protection=0.03,
              setting="FaceScrub, one user", ours="poisoning/fawkes-v1-high/sface/adaptive/nearest-neighbour",
              why="FaceCure's robust extractor (`adaptive`: other users' clean photos and every defense's cloaks), "
              "then 1-NN"),
    Published(source=_FC, defense="Fawkes v1.0 high", tracker="adaptive end-to-end", protection=0.03,
              setting="FaceScrub, one user", ours="poisoning/fawkes-v1-high/sface/adaptive-end-to-end/softmax",
              why="FaceCure's eval_e2e.py --robust (`adaptive-end-to-end`: the end-to-end recipe on the enrollment "
              "set plus the public identities' cloaks by every defense), scored by its softmax"),
    Published(source=_FC, defense="LowKey", tracker="baseline NN (Fawkes 0.3 extractor)", protection=0.94,
              setting="FaceScrub, one user", ours=_LOWKEY_NN,
              why="LowKey's ensemble had no Fawkes extractor; the white-box SFace NN is the closest we have"),
    Published(source=_FC, defense="LowKey", tracker="end-to-end", protection=0.97,
              setting="FaceScrub, one user", ours="poisoning/lowkey/sface/end-to-end/softmax",
              why="FaceCure's end-to-end recipe (`end-to-end`) on the white-box extractor, scored by its softmax"),
    Published(source=_FC, defense="LowKey", tracker="oblivious (MagFace)", protection=1.00,
              setting="FaceScrub, one user", ours="poisoning/lowkey/facenet-msceleb/none/nearest-neighbour",
              why=_OBLIVIOUS),
    Published(source=_FC, defense="LowKey", tracker="oblivious (CLIP)", protection=0.24,
              setting="FaceScrub, one user", why="no counterpart: no general-purpose image model in the zoo"),
    Published(source=_FC, defense="LowKey", tracker="adaptive NN", protection=0.03,
              setting="FaceScrub, one user", ours="poisoning/lowkey/sface/adaptive/nearest-neighbour",
              why="FaceCure's robust extractor (`adaptive`), then 1-NN"),
    Published(source=_FC, defense="LowKey", tracker="adaptive end-to-end", protection=0.03,
              setting="FaceScrub, one user", ours="poisoning/lowkey/sface/adaptive-end-to-end/softmax",
              why="FaceCure's eval_e2e.py --robust (`adaptive-end-to-end`: the end-to-end recipe on the enrollment "
              "set plus the public identities' cloaks by every defense), scored by its softmax"),
    Published(source=_FAWKES_PAPER, defense="Fawkes (paper version)", tracker="trained on cloaks",
              protection=0.95, setting="'95%+', every user photo cloaked",
              ours="poisoning/fawkes-high/sface/none/nearest-neighbour",
              why="the paper's targeted cloak is the 0.3 release's (`fawkes-high`: rho 0.008, near the paper's "
              "0.007); the tracker trains on the cloaks, then sees clean photos"),
    Published(source=_FAWKES_PAPER, defense="Fawkes (paper version)", tracker="with leaked clean photos",
              protection=0.80, setting="'80%+' when some clean photos leak",
              ours="poisoning/fawkes-high-half/sface/none/nearest-neighbour",
              why="the same cloak with half of the user's enrollment photos left clean (cloak_fraction 0.5)"),
    Published(source=_FAWKES_PAPER, defense="Fawkes (robust)", tracker="Rekognition", protection=1.00,
              setting="commercial API, 2020 ('100% effective')",
              ours="poisoning/fawkes-high/rekognition-msceleb/none/service",
              why="the paper's robust cloaks were optimised on an adversarially trained extractor to transfer; "
              "ours are the 0.3 cloak on SFace (not robust), so this is a lower bound for what the paper meant"),
    Published(source=_FAWKES_PAPER, defense="Fawkes (robust)", tracker="Azure Face", protection=1.00,
              setting="commercial API, 2020 ('100% effective')",
              ours="poisoning/fawkes-high/azure-dlib/none/service",
              why="as for Rekognition: a non-robust 0.3 cloak through an Azure-like person group on dlib ResNet"),
    Published(source=_LOWKEY_PAPER, defense="LowKey", tracker="Rekognition (rank-1)",
              protection=0.99, setting="'accuracy below 1%', gallery cloaked, clean probes",
              ours="evasion/lowkey/rekognition-msceleb/none/service-search",
              why="LowKey's protocol: a Rekognition-like collection (FaceNet-MSCeleb) holds the cloaked gallery"),
    Published(source=_LOWKEY_PAPER, defense="LowKey", tracker="Rekognition (rank-1)",
              protection=0.99, setting="'accuracy below 1%', gallery cloaked, clean probes",
              ours="evasion/lowkey/rekognition-dlib/none/service-search",
              why="the same with dlib ResNet behind the collection"),
    Published(source=_LOWKEY_PAPER, defense="LowKey", tracker="Azure Face (rank-1)",
              protection=0.99, setting="'accuracy below 1%', gallery cloaked, clean probes",
              why="no counterpart: an Azure person group identifies, it has no gallery search to rank"),
)  # fmt: skip


def side_by_side(runs: Mapping[str, Mapping[str, Any]]) -> Table:
    """Published numbers next to ours: one column per run (its headline, by suite name), '–' where a run has no
    such cell."""
    names = list(runs)
    rows = []
    for p in PUBLISHED:
        row: dict[str, Any] = {
            "source": p.source, "defense": p.defense, "tracker": p.tracker, "published": p.protection,
            "ours": p.ours or "no counterpart", "why": p.why,
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
            "interval (identity-clustered; exact binomial for one person); SFace stands in for the defense's own "
            "extractor, FaceNet-MSCeleb for an oblivious "
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
            Column(key="why", header="why this cell", numeric=False),
            *(Column(key=f"run{i}", header=name) for i, name in enumerate(names)),
        ),
        rows=tuple(rows),
    )
