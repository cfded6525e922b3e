"""The worst case over countermeasures, from stored per-image rows (pure functions).

A tracker is not limited to one countermeasure: it can try JPEG, blur, an adaptive model, a linear probe...
and it wins on a photo as soon as any of them identifies it. So per protected query photo, protection
holds only if *every* countermeasure (and classifier) of the suite failed on it. The rows come from
``queries.csv`` (or the runner's rows before they are written); only cells whose summary ``status`` is
``ok`` take part — a refused or failed cell is no evidence either way, and the table says which
countermeasures were counted.

Two groupings: per (seed, protocol, defense, recognizer), and per (seed, protocol, defense) over every
recognizer too (``recognizer = "*"``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cloakbench.bench.metrics import protection_interval

CELL_KEYS = ("seed", "protocol", "defense", "recognizer", "countermeasure", "classifier")
ANY_RECOGNIZER = "*"


def truthy(value: Any) -> bool:
    """A stored or CSV boolean (``True``, ``'true'``, ``'1'``, ``'yes'``) as a bool."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _cell_key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(row.get(k, "")) for k in CELL_KEYS)


def worst_case(
    queries: Iterable[Mapping[str, Any]], summary: Iterable[Mapping[str, Any]], *, resamples: int = 1000,
    confidence: float = 0.95, seed: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per group: the protection rate when a photo counts as protected only if no countermeasure
    identified it, with its interval (:func:`~cloakbench.bench.metrics.protection_interval`), the countermeasures
    counted, and the strongest one (the one that identified the most photos; on a tie the first in the rows'
    order, which is the suite's: ``none`` before any countermeasure)."""
    ok = {_cell_key(r) for r in summary if str(r.get("status", "")) == "ok"}
    # group -> photo -> identified by any countermeasure so far; group -> countermeasure -> photos it identified
    photos: dict[tuple[str, ...], dict[tuple[str, str], bool]] = defaultdict(dict)
    hits: dict[tuple[str, ...], dict[str, set[tuple[str, str]]]] = defaultdict(lambda: defaultdict(set))
    for row in queries:
        key = _cell_key(row)
        if key not in ok:
            continue
        seed_, protocol, defense, recognizer, cm, clf = key
        photo = (str(row.get("protected_identity", "")), str(row.get("image_id", "")))
        correct = truthy(row.get("correct"))
        groups: tuple[tuple[str, ...], ...] = (
            (seed_, protocol, defense, recognizer),
            (seed_, protocol, defense, ANY_RECOGNIZER),
        )
        for group in groups:
            photos[group][photo] = photos[group].get(photo, False) or correct
            tracker = f"{cm}/{clf}" if group[3] != ANY_RECOGNIZER else f"{recognizer}/{cm}/{clf}"
            bucket = hits[group][tracker]
            if correct:
                bucket.add(photo)
    out = []
    rng = np.random.default_rng(seed)
    for group in sorted(photos, key=lambda g: (g[0], g[1], g[2], g[3] == ANY_RECOGNIZER, g[3])):
        identified = np.array([photos[group][p] for p in sorted(photos[group])], dtype=bool)
        protected = 1.0 - identified.astype(np.float64)
        people = [p[0] for p in sorted(photos[group])]
        lo, hi = protection_interval(protected, people, rng=rng, resamples=resamples, confidence=confidence)
        trackers = hits[group]
        strongest = max(trackers, key=lambda t: len(trackers[t]))  # ties: the first in the rows' (suite) order
        n = len(identified)
        out.append({
            "seed": group[0], "protocol": group[1], "defense": group[2], "recognizer": group[3],
            "n_queries": n, "n_countermeasures": len(trackers),
            "worst_case_protection": float(protected.mean()), "ci_low": lo, "ci_high": hi,
            "strongest": strongest, "strongest_protection": 1.0 - len(trackers[strongest]) / n,
            "countermeasures": ";".join(sorted(trackers)),
        })  # fmt: skip
    return out


def markdown_worst_case(rows: Sequence[Mapping[str, Any]]) -> str:
    header = ["protocol", "defense", "recognizer", "seed", "worst-case protection (95% CI)", "strongest countermeasure",
              "its protection", "countermeasures counted"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            str(r["protocol"]), str(r["defense"]), "every recognizer" if r["recognizer"] == ANY_RECOGNIZER
            else str(r["recognizer"]), str(r["seed"]),
            f"{r['worst_case_protection']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]", str(r["strongest"]),
            f"{r['strongest_protection']:.2f}", str(r["n_countermeasures"]),
        ]  # fmt: skip
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
