"""The literature, reproduced small: ``suites/facecure-tiny.yaml`` re-run from scratch and checked against the
headline numbers stored in ``docs/reproduction/facecure-tiny.json``.

The stored numbers change only through ``python scripts/reproduce.py facecure-tiny --update``; this test never
writes them (it checks that the file is untouched). The run gets its own empty artifact cache (model files
shared), so every cloak, embedding and retrained model is made again. Tolerance: one query photo per cell
(the rates are over 6 photos, so 1/6), two for the cells of retrained trackers (measured: 2 of 6 across an
AMD EPYC and an Intel Xeon): another CPU may flip a photo on a decision boundary, a regression in a defense, a
tracker or the protocol flips many. On top of the stored numbers, the pattern must hold in this
run: high protection against the baseline trackers, far less when half the user's photos are left clean, and
far less against FaceCure's adaptive tracker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloakbench.bench.suite import Suite, load_suite
from cloakbench.cache import overlay_cache
from cloakbench.cli import main
from cloakbench.reports.data import load_run
from cloakbench.reports.render import Estimate
from cloakbench.reports.reproduction import PUBLISHED, compare, headline, portable_config, side_by_side

ROOT = Path(__file__).resolve().parents[1]
STORED = ROOT / "docs" / "reproduction" / "facecure-tiny.json"
SUITE = ROOT / "suites" / "facecure-tiny.yaml"
RETRAINED = frozenset({"end-to-end", "adaptive", "adaptive-end-to-end"})
"""Countermeasures that retrain the tracker (a cell is keyed protocol/defense/recognizer/countermeasure/...)."""


def rate(numbers: dict[str, object], defense: str, countermeasure: str, classifier: str = "nearest-neighbour") -> float:
    cells = numbers["cells"]
    assert isinstance(cells, dict)
    return float(cells[f"poisoning/{defense}/sface/{countermeasure}/{classifier}"]["protection"])


@pytest.mark.slow
def test_facecure_tiny_reproduces_its_stored_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, celeb24_root: Path
) -> None:
    stored_bytes = STORED.read_bytes()
    stored = json.loads(stored_bytes)
    cache = tmp_path / "cache"
    overlay_cache(cache)
    monkeypatch.setenv("CLOAKBENCH_CACHE", str(cache))
    assert main(["run", str(SUITE), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    fresh = headline(load_run(tmp_path / "run"))

    # a retrained tracker's cells get two photos: its training sums floats in the CPU's order, and the adaptive
    # tracker's linear cell moved by 2 of 6 photos between the AMD EPYC that stored the numbers (0.33) and an Intel
    # Xeon (0.00, CI of 2026-12-02); every other cell matched within one photo there
    def retrained(problem: str) -> bool:
        return problem.split(":")[0].split("/")[3] in RETRAINED

    assert [p for p in compare(stored, fresh, photos=1) if not retrained(p)] == []
    assert [p for p in compare(stored, fresh, photos=2) if retrained(p)] == []
    for numbers in (stored, fresh):
        for clf in ("nearest-neighbour", "linear"):
            for defense in ("fawkes-v1-high", "lowkey"):  # stored: 1.00 for both, both classifiers
                assert rate(numbers, defense, "none", clf) >= 0.8, (defense, clf)
            # stored: half clean 0.17 (NN) and 0.00 (linear) against 1.00 with every photo cloaked
            assert (
                rate(numbers, "fawkes-v1-high-half", "none", clf) <= rate(numbers, "fawkes-v1-high", "none", clf) - 0.5
            )
        # FaceCure's adaptive tracker (both defenses' cloaks of other users, 30 batches, its head on the raw
        # features) lowers Fawkes v1.0 high: stored 0.67 NN / 0.33 linear from 1.00 / 1.00, a drop of 1.00 summed
        # over the two classifiers; >= 0.5 leaves room for one photo per cell. LowKey stays at 1.00 at this size
        # (not asserted; docs/reproduction.md, "Then the head moved to the raw features").
        drop = sum(
            rate(numbers, "fawkes-v1-high", "none", clf) - rate(numbers, "fawkes-v1-high", "adaptive", clf)
            for clf in ("nearest-neighbour", "linear")
        )
        assert drop >= 0.5, drop
    assert STORED.read_bytes() == stored_bytes  # the test reads the stored numbers, never writes them


def test_compare_counts_tolerance_in_photos() -> None:
    base = {"config": {"name": "x"}, "cells": {"a": {"status": "ok", "queries": 6, "protection": 0.5}}}
    one_photo = {"config": {"name": "x"}, "cells": {"a": {"status": "ok", "queries": 6, "protection": 0.5 + 1 / 6}}}
    two_photos = {"config": {"name": "x"}, "cells": {"a": {"status": "ok", "queries": 6, "protection": 0.5 + 2 / 6}}}
    assert compare(base, one_photo) == []
    assert compare(base, two_photos) == [
        "a: protection 0.833, stored 0.500 (2 of 6 photos changed outcome; tolerance 1)"
    ]
    assert compare(base, two_photos, photos=0) != [] and compare(base, base, photos=0) == []
    assert compare(base, {**base, "cells": {"a": {**base["cells"]["a"], "queries": 7}}})[0].endswith("stored 6")
    failed = {"config": {"name": "x"}, "cells": {"a": {"status": "failed: boom", "queries": 0}}}
    assert compare(base, failed) == ["a: status 'failed: boom', stored 'ok'"]
    assert compare(base, {"config": {"name": "y"}, "cells": {}})[0].startswith("the suite changed since the numbers")
    assert compare(base, {"config": {"name": "x"}, "cells": {}}) == ["a: missing from this run"]


def test_compare_is_exact_about_a_one_photo_tolerance() -> None:
    """What failed on an AMD EPYC: stored 1/6 rounded to six decimals (0.166667 > 1/6 + 1e-9) against a fresh 0,
    one photo apart, was refused by a one-photo tolerance. Counts of photos compare exactly, in both directions
    and with or without the stored count."""
    one_sixth = {"config": {}, "cells": {"a": {"status": "ok", "queries": 6, "protection": 0.166667}}}
    counted = {"config": {}, "cells": {"a": {"status": "ok", "queries": 6, "protection": 0.166667, "protected": 1}}}
    zero = {"config": {}, "cells": {"a": {"status": "ok", "queries": 6, "protection": 0.0, "protected": 0}}}
    for x, y in ((one_sixth, zero), (zero, one_sixth), (counted, zero), (zero, counted)):
        assert compare(x, y, photos=1) == []
        assert compare(x, y, photos=0) == ["a: protection " + f"{y['cells']['a']['protection']:.3f}, stored "
                                           f"{x['cells']['a']['protection']:.3f} (1 of 6 photos changed outcome; "
                                           "tolerance 0)"]  # fmt: skip


def _suite_could_have(suite: Suite, cell: str) -> bool:
    """Whether ``protocol/defense/recognizer/countermeasure/classifier`` names parts that ``suite`` has."""
    protocol, defense, recognizer, countermeasure, classifier = cell.split("/")
    trackers = {*suite.classifiers, "softmax", "gallery-search", "service", "service-search"}
    return (
        protocol in {p.value for p in suite.protocols}
        and defense in {d.label for d in suite.defenses}
        and recognizer in {*suite.recognizers, *(s.label for s in suite.services)}
        and countermeasure in {c.label for c in suite.countermeasures}
        and classifier in trackers
    )


def test_every_published_number_names_a_cell_some_stored_run_has() -> None:
    """A typo in a ``Published.ours`` key would leave its row empty forever: each key must be a cell of a stored
    run, or of a reproduction suite not run yet (the full GPU-sized ones: its row stays '–' until it runs). Every
    mapping says why in one line."""
    stored = {p.stem: json.loads(p.read_text()) for p in sorted(STORED.parent.glob("*.json"))}
    assert {"facecure-reduced", "facecure-tiny", "lowkey-reduced"} <= set(stored)
    suites = [load_suite(ROOT / "suites" / f"{name}.yaml") for name in ("facecure", "lowkey")]
    for published in PUBLISHED:
        assert len(published.why) > 20, published
        if published.ours is None:
            assert published.why.startswith("no counterpart"), published
            continue
        holders = [name for name, numbers in stored.items() if published.ours in numbers["cells"]]
        planned = [s.name for s in suites if _suite_could_have(s, published.ours)]
        assert holders or planned, f"{published.source} / {published.tracker}: no run or suite has {published.ours}"
    # the paper version's claims are measured by the full suite only (until it runs: '–')
    assert _suite_could_have(suites[0], "poisoning/fawkes-high-half/sface/none/nearest-neighbour")
    assert not _suite_could_have(suites[0], "poisoning/fawkes-hihg/sface/none/nearest-neighbour")


def test_side_by_side_puts_each_runs_cell_beside_the_published_number() -> None:
    first = PUBLISHED[0]
    assert first.ours is not None
    runs = {
        "a": {"cells": {first.ours: {"status": "ok", "queries": 6, "protection": 0.5, "ci": [0.2, 0.8]}}},
        "b": {"cells": {}},
    }
    table = side_by_side(runs)
    assert [c.header for c in table.columns][-2:] == ["a", "b"]
    row = table.rows[0]
    assert row["published"] == first.protection and row["run0"] == Estimate(0.5, 0.2, 0.8) and "run1" not in row
    no_counterpart = [r for r, p in zip(table.rows, PUBLISHED, strict=True) if p.ours is None]
    assert no_counterpart and all(r["ours"] == "no counterpart" and "run0" not in r for r in no_counterpart)


@pytest.mark.parametrize("name", ["facecure-reduced", "lowkey-reduced", "facecure-tiny", "opom"])
def test_stored_numbers_belong_to_the_suite_file_as_it_is(name: str) -> None:
    """Editing a reproduction suite without re-running it would leave numbers on the results page that no
    longer describe the suite: the stored config must be the suite file's, checkout paths aside."""
    stored = json.loads((STORED.parent / f"{name}.json").read_text())
    suite = load_suite(ROOT / "suites" / f"{name}.yaml")
    assert stored["config"] == portable_config(json.loads(json.dumps(suite.to_dict(), default=str))), (
        f"suites/{name}.yaml changed since docs/reproduction/{name}.json was stored: "
        f"python scripts/reproduce.py {name} --update"
    )
