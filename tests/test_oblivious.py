"""The oblivious tracker: cloaks evaluated only by recognizers that played no part in making them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloakbench.bench.output import write_run
from cloakbench.bench.runner import run_suite
from cloakbench.bench.suite import parse_suite


def suite(root: Path, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "oblivious-test",
        "dataset": {"source": "folder", "path": str(root), "max_per_identity": 4},
        "protected": {"count": 2},
        "defenses": [
            {"name": "pgd", "surrogates": ["sface"], "params": {"epsilon": 8 / 255, "steps": 5}},
            {"name": "noise", "params": {"epsilon": 8 / 255}},
        ],
        "recognizers": ["sface", "sface-onnx", "facenet-casia"],
        "classifiers": ["nearest-neighbour"],
        "device": "cpu",
        **overrides,
    }


@pytest.mark.parametrize("oblivious_only", [False, True])
def test_oblivious_column_and_option(celeb24_root: Path, tmp_path: Path, oblivious_only: bool) -> None:
    result = run_suite(parse_suite(suite(celeb24_root, oblivious_only=oblivious_only), where="test suite"))
    seen = {(r["defense"], r["recognizer"]): r["oblivious"] for r in result.summary}
    # sface-onnx runs the same weights as sface: a cloak made on sface is not oblivious to it
    white_box = {("pgd", "sface"): False, ("pgd", "sface-onnx"): False}
    oblivious = {
        ("pgd", "facenet-casia"): True,
        **{("noise", r): True for r in ("sface", "sface-onnx", "facenet-casia")},
    }
    assert seen == (oblivious if oblivious_only else {**white_box, **oblivious})
    write_run(result, tmp_path)
    table = (tmp_path / "summary.md").read_text().split("## Oblivious trackers")[1]
    pgd_line = next(line for line in table.splitlines() if line.startswith("| poisoning | pgd |"))
    assert "(facenet-casia)" in pgd_line
    assert ("(sface" in pgd_line) is not oblivious_only  # the surrogate column is empty when only oblivious ran
