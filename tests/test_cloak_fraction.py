"""``cloak_fraction``: a user who cloaks only some of their photos (FaceCure's half-clean setting).

On celeb24 with the real SFace: PGD at 8/255 made on SFace, every protected user's enrollment photos cloaked
vs only the first half of them; the tracker keeps the rest clean and finds the user through them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cloakbench.bench.runner import run_suite
from cloakbench.bench.suite import DefenseSpec, parse_suite
from cloakbench.errors import ConfigError

PGD = {"name": "pgd", "surrogates": ["sface"], "params": {"epsilon": 8 / 255, "steps": 5, "random_start": True}}


def test_half_clean_protects_less_than_all_cloaked(celeb24_root: Path) -> None:
    suite = parse_suite(
        {
            "name": "fraction",
            "dataset": {"source": "folder", "path": str(celeb24_root), "max_per_identity": 10},
            "protected": {"count": 4},
            "defenses": [{**PGD, "label": "pgd-all"}, {**PGD, "label": "pgd-half", "cloak_fraction": 0.5}],
            "recognizers": ["sface"],
            "countermeasures": ["none"],
            "classifiers": ["nearest-neighbour"],
            "bootstrap": {"resamples": 200},
            "device": "cpu",
        },
        where="test suite",
    )
    result = run_suite(suite)
    rate = {r["defense"]: r["protection_rate"] for r in result.summary}
    # measured (4 users x 3 queries): all cloaked 1.00, half clean 0.00 — the clean half gives the user away
    assert rate["pgd-all"] >= 0.9
    assert rate["pgd-half"] <= rate["pgd-all"] - 0.5
    # one set of cloaks serves both rows (Suite.cloak_source): the same photos, pixel for pixel, so their quality
    # rows are equal to the last digit
    by_defense: dict[str, list[dict[str, object]]] = {}
    for c in result.cloaks:
        by_defense.setdefault(c["defense"], []).append({k: v for k, v in c.items() if k != "defense"})
    assert by_defense["pgd-all"] == by_defense["pgd-half"]
    assert suite.cloak_source(suite.defenses[1]) is suite.defenses[0]


@pytest.mark.parametrize(("photos", "fraction", "cloaked"), [(7, 1.0, 7), (7, 0.5, 4), (6, 0.5, 3), (1, 0.1, 1)])
def test_cloaked_count(photos: int, fraction: float, cloaked: int) -> None:
    assert DefenseSpec(name="pgd", cloak_fraction=fraction).cloaked_count(photos) == cloaked


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.5])
def test_a_fraction_outside_0_1_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match=rf"defenses\[0\].*cloak_fraction must be in \(0, 1\], got {fraction}"):
        parse_suite(
            {"name": "x", "dataset": {"source": "demo"}, "defenses": [{"name": "pgd", "cloak_fraction": fraction}],
             "recognizers": ["sface"]},
            where="x",
        )  # fmt: skip
