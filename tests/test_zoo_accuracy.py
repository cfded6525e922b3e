"""Clean nearest-neighbour top-1 accuracy of every runnable recognizer on celeb24.

All 24 identities, capped at 40 photos each (a seeded sample, to keep CI under its time: 942 photos, 283
queries in the 30 % split; the whole set, 552 queries, took 344 s of the CI run, the cap 202 s). Each
threshold sits just under what was measured, so a regression in any model's weights, preprocessing or
alignment fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cloakbench.bench.runner import run_suite
from cloakbench.bench.suite import parse_suite

PHOTOS_PER_IDENTITY = 40

# recognizer: (measured clean top-1 with the cap [2026-11-30], on all of celeb24 with `cloakbench run
# suites/zoo.yaml`, threshold)
MEASURED = {
    "sface": (1.000, 0.996, 0.99),
    "sface-onnx": (1.000, 0.996, 0.99),
    "sface-insightface": (1.000, 0.996, 0.99),
    "facenet-casia": (0.996, 0.998, 0.99),
    "facenet-msceleb": (1.000, 0.998, 0.99),
    "dlib-resnet": (0.996, 0.993, 0.98),
}


@pytest.mark.slow
def test_clean_accuracy_of_every_recognizer(celeb24_root: Path) -> None:
    suite = parse_suite(
        {
            "name": "zoo-accuracy",
            "dataset": {"source": "folder", "path": str(celeb24_root), "max_per_identity": PHOTOS_PER_IDENTITY},
            "protected": {"count": 1},
            "defenses": ["noise"],
            "recognizers": list(MEASURED),
            "classifiers": ["nearest-neighbour"],
            "device": "cpu",
        },
        where="zoo accuracy suite",
    )
    rows = {r["recognizer"]: r for r in run_suite(suite).summary}
    for name, (_capped, _whole, threshold) in MEASURED.items():
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["clean_accuracy_all"] >= threshold, (name, rows[name]["clean_accuracy_all"])
        assert rows[name]["n_queries"] > 0
