"""Clean nearest-neighbour top-1 accuracy of every runnable recognizer on all of celeb24.

Queries are the 30 % split of every one of the 24 identities (552 photos). Each threshold sits just
under what was measured with ``cloakbench run suites/zoo.yaml`` (numbers in the table below), so a
regression in any model's weights, preprocessing or alignment fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cloakbench.bench.runner import run_suite
from cloakbench.bench.suite import parse_suite

# recognizer: (measured clean top-1, threshold)
MEASURED = {
    "sface": (0.996, 0.99),
    "sface-onnx": (0.996, 0.99),
    "sface-insightface": (0.996, 0.99),
    "facenet-casia": (0.998, 0.99),
    "facenet-msceleb": (0.998, 0.99),
    "dlib-resnet": (0.993, 0.98),
}


@pytest.mark.slow
def test_clean_accuracy_of_every_recognizer(celeb24_root: Path) -> None:
    suite = parse_suite(
        {
            "name": "zoo-accuracy",
            "dataset": {"source": "folder", "path": str(celeb24_root)},
            "protected": {"count": 1},
            "defenses": ["noise"],
            "recognizers": list(MEASURED),
            "classifiers": ["nearest-neighbour"],
            "device": "cpu",
        },
        where="zoo accuracy suite",
    )
    rows = {r["recognizer"]: r for r in run_suite(suite).summary}
    for name, (_measured, threshold) in MEASURED.items():
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["clean_accuracy_all"] >= threshold, (name, rows[name]["clean_accuracy_all"])
        assert rows[name]["n_queries"] > 0
