"""``cloakbench.results(RUN)`` / ``load_results``: a real stored run as typed pandas DataFrames, checked against
the CSV files the run wrote; the notebook example (examples/notebook.py) run as a script on it; errors.

The run: 4 celeb24 identities x 8 photos, two protected (one named ``<script>alert(1)</script>``), PGD 8/255
and uniform noise against SFace in PyTorch and onnxruntime, with and without JPEG q=75 (the cloaks and
embeddings of tests/test_leaderboard.py's first run, so one of the two comes from the cache).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cloakbench.bench.store import StoreError
from cloakbench.errors import ConfigError
from cloakbench.results import DTYPES, RunResults, load_results

SCRIPT = "<script>alert(1)</script>"
PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory: pytest.TempPathFactory, names_dataset: tuple[Path, Path]) -> Path:
    root, names = names_dataset
    work = tmp_path_factory.mktemp("results_run")
    suite = {
        "name": "results-test",
        "dataset": {"source": "folder", "path": str(root), "names": str(names)},
        "protected": {"identities": [SCRIPT, "Drew_Barrymore"]},
        "defenses": [
            {"name": "pgd", "label": "pgd-8", "params": {"epsilon": 8 / 255, "steps": 5}},
            {"name": "noise", "params": {"epsilon": 8 / 255}},
        ],
        "recognizers": ["sface", "sface-onnx"],
        "countermeasures": [
            "none",
            {"name": "jpeg", "label": "jpeg-75", "params": {"quality": 75}, "apply_to": "both"},
        ],
        "classifiers": ["nearest-neighbour"],
        "bootstrap": {"resamples": 200},
    }
    path = work / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, allow_unicode=True))
    run = work / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "cloakbench.cli", "run", str(path), "--out", str(run), "--quiet"],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_table_has_its_declared_dtypes(stored_run: Path) -> None:
    results = load_results(stored_run)
    assert isinstance(results, RunResults) and results.name == "results-test"
    for table, dtypes in DTYPES.items():
        frame: pd.DataFrame = getattr(results, table)
        assert list(frame.columns) == list(dtypes), table
        for column, dtype in dtypes.items():
            assert str(frame[column].dtype) == dtype or (dtype == "category" and frame[column].dtype == "category"), (
                table, column, frame[column].dtype)  # fmt: skip
    cells = results.cells
    # the axes are categoricals in the suite's order, whatever order the rows came in
    assert list(cells["defense"].cat.categories) == ["pgd-8", "noise"]
    assert list(cells["countermeasure"].cat.categories) == ["none", "jpeg-75"]
    assert list(cells["recognizer"].cat.categories) == ["sface", "sface-onnx"]
    assert SCRIPT in set(results.queries["protected_identity"])
    assert results.adaptations.empty and list(results.adaptations.columns) == list(DTYPES["adaptations"])
    assert set(results.tasks["kind"]) == {"cloak", "evaluate"} and (results.tasks["status"] == "ok").all()
    assert results.tasks["finished_utc"].dt.tz is not None


def test_rows_match_the_csv_files_the_run_wrote(stored_run: Path) -> None:
    results = load_results(stored_run)
    summary = _csv(stored_run / "summary.csv")
    assert len(results.cells) == len(summary) == 2 * 2 * 2
    key = ["defense", "recognizer", "countermeasure", "classifier"]
    cells = results.cells.set_index(key)
    for row in summary:
        cell = cells.loc[tuple(row[k] for k in key)]
        assert cell["status"] == row["status"]
        for column in ("protection_rate", "ci_low", "ci_high", "clean_accuracy_protected", "cloak_s_per_image"):
            assert cell[column] == pytest.approx(float(row[column]), abs=1e-12), column
        assert bool(cell["oblivious"]) == (row["oblivious"] == "True")
        assert int(cell["n_queries"]) == int(row["n_queries"])
    queries = _csv(stored_run / "queries.csv")
    assert len(results.queries) == len(queries)
    assert int(results.queries["correct"].sum()) == sum(q["correct"] == "True" for q in queries)
    cloaks = _csv(stored_run / "cloaks.csv")
    assert len(results.cloaks) == len(cloaks) > 0
    assert results.cloaks["ssim"].sum() == pytest.approx(sum(float(c["ssim"]) for c in cloaks), rel=1e-12)
    # a protection rate is 1 - top-1 accuracy over the cell's query rows
    q = results.queries
    for (defense, rec, cm), part in q.groupby(["defense", "recognizer", "countermeasure"], observed=True):
        rate = cells.loc[(defense, rec, cm, "nearest-neighbour"), "protection_rate"]
        assert rate == pytest.approx(1.0 - part["correct"].astype(float).mean(), abs=1e-12)


def test_cloakbench_results_is_lazy_and_loads_no_model(stored_run: Path) -> None:
    code = (
        "import json, sys\n"
        "import cloakbench\n"
        "light = {m: m in sys.modules for m in ('pandas', 'torch')}\n"
        f"r = cloakbench.results({str(stored_run)!r})\n"
        "from cloakbench.results import load_results\n"
        f"same = load_results({str(stored_run)!r}).cells.equals(r.cells)\n"
        "print(json.dumps({'before': light, 'torch': 'torch' in sys.modules, 'cells': len(r.cells), 'same': same}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome == {"before": {"pandas": False, "torch": False}, "torch": False, "cells": 8, "same": True}


def test_a_folder_that_is_not_a_run_is_one_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nowhere'}: no results store here"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "results.sqlite").write_bytes(b"not a database, just some bytes" * 200)
    with pytest.raises(StoreError, match=f"{tmp_path / 'junk' / 'results.sqlite'}: not a cloakbench results store"):
        load_results(tmp_path / "junk")


def test_the_notebook_example_runs_and_its_pivot_is_the_stored_rates(stored_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "notebook"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", str(PROJECT / "examples" / "notebook.py"), str(stored_run),
         str(out)],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "protection rate, poisoning protocol" in proc.stdout
    pivot = _csv(out / "protection-poisoning.csv")
    assert [r["defense"] for r in pivot] == ["pgd-8", "noise"]  # the suite's order
    summary = {(r["defense"], r["recognizer"], r["countermeasure"]): r for r in _csv(stored_run / "summary.csv")}
    trackers = [c for c in pivot[0] if c != "defense"]
    assert len(trackers) == 4  # 2 recognizers x 2 countermeasures x 1 classifier
    for row in pivot:
        for tracker in trackers:
            rec, cm, clf = tracker.split(" / ")
            stored = summary[(row["defense"], rec, cm)]
            assert clf == stored["classifier"] and stored["status"] == "ok"
            assert float(row[tracker]) == pytest.approx(float(stored["protection_rate"]), abs=1e-12)
    with Image.open(out / "protection-poisoning.png") as img:
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert img.size[0] > 400 and pixels.std() > 20  # a drawn heat map, not a blank canvas
