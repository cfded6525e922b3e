"""Suite validation: every malformed suite is refused before any work, naming the file, the key path and the problem.

Each case is a small edit of the built-in quick suite (or raw YAML text), written to a file; the error that
``cloakbench validate`` prints must contain ``<file>: <key path and problem>`` verbatim, and ``cloakbench run``
must refuse the same file with exit code 2 without creating its run folder.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloakbench.bench.suite import builtin_suite_path, builtin_suites, load_suite
from cloakbench.cli import EXIT_BAD_INPUT, EXIT_OK, main
from cloakbench.errors import ConfigError

QUICK_TEXT = (Path(__file__).resolve().parents[1] / "suites" / "quick.yaml").read_text(encoding="utf-8")
QUICK: dict[str, Any] = yaml.safe_load(QUICK_TEXT)
QUICK_LINES = len(QUICK_TEXT.splitlines())
QUICK_SEEDS = next(i for i, line in enumerate(QUICK_TEXT.splitlines(), 1) if line.startswith("seeds:"))

Edit = Callable[[dict[str, Any]], object]


def _folder(data: dict[str, Any], **protected: Any) -> None:
    """Use the ``faces`` folder beside the suite (alice and bob with 2 photos, carol with 1) as the dataset."""
    data["dataset"] = {"source": "folder", "path": "faces"}
    data["protected"] = protected


# (case id, the suite: raw YAML text or an edit of the quick suite, what the error says after "<file>: ")
CASES: list[tuple[str, str | Edit, str]] = [
    (
        "yaml syntax error",
        "name: quick\ndefenses:\n  - {name: pgd, params: {epsilon: 0.03}\nrecognizers: [sface]\n",
        "line 4, column 1: not valid YAML: expected ',' or '}', but got '<scalar>' "
        "(while parsing a flow mapping at line 3, column 5)",
    ),
    (
        "duplicate key",
        QUICK_TEXT + "seeds: [1]\n",
        f"line {QUICK_LINES + 1}, column 1: not valid YAML: duplicate key 'seeds' (first given on line {QUICK_SEEDS})",
    ),
    ("empty file", "", "the suite is empty (expected a mapping with at least name, defenses, recognizers)"),
    ("top level is a list", "- name: quick\n- recognizers: [sface]\n", "top level: expected a mapping, got list"),
    (
        "unknown top-level key",
        lambda d: d.update(recogniser=["sface"]),
        "unknown key(s) 'recogniser'; did you mean 'recognizers'? (allowed: bootstrap, classifiers,",
    ),
    (
        "unknown nested key",
        lambda d: d["dataset"].update(trian_fraction=0.7),
        "dataset: unknown key(s) 'trian_fraction'; did you mean 'train_fraction'? (allowed: align,",
    ),
    (
        "string where a number is expected",
        lambda d: d["dataset"].update(train_fraction="0.7"),
        "dataset.train_fraction: expected a number, got str '0.7'",
    ),
    (
        "list where a mapping is expected",
        lambda d: d.update(dataset=["demo"]),
        "dataset: expected a mapping, got list ['demo']",
    ),
    (
        "mapping where a list is expected",
        lambda d: d.update(defenses={"name": "pgd"}),
        "defenses: expected a non-empty list, got dict {'name': 'pgd'}",
    ),
    (
        "string where a list of names is expected",
        lambda d: d.update(recognizers="sface"),
        "recognizers: expected a non-empty list of names, got str 'sface'",
    ),
    (
        "unknown defense",
        lambda d: d["defenses"][1].update(name="fawks"),
        "defenses[1].name: unknown defense 'fawks'; did you mean 'fawkes'",
    ),
    (
        "unknown recognizer",
        lambda d: d.update(recognizers=["sface", "arcface"]),
        "recognizers[1]: unknown recognizer 'arcface'",
    ),
    (
        "unknown surrogate",
        lambda d: d["defenses"][0].update(surrogates=["sfce"]),
        "defenses[0].surrogates[0]: unknown recognizer 'sfce'; did you mean 'sface'?",
    ),
    ("unknown classifier", lambda d: d.update(classifiers=["knn"]), "classifiers[0]: unknown classifier 'knn'"),
    (
        "unknown countermeasure",
        lambda d: d["countermeasures"][1].update(name="jpg"),
        "countermeasures[1].name: unknown countermeasure 'jpg' (input transforms and adaptations: bit-depth,",
    ),
    (
        "unknown robust transform",
        lambda d: d["defenses"][0].update(robust={"transforms": ["none", "jpg"]}),
        "defenses[0].robust.transforms[1]: unknown transform 'jpg'; did you mean 'jpeg'?",
    ),
    (
        "unknown defense parameter",
        lambda d: d["defenses"][0]["params"].update(epsilom=0.1),
        "defenses[0].params: unknown key(s) 'epsilom'; did you mean 'epsilon'? (allowed: batch_size, epsilon,",
    ),
    (
        "unknown adaptation parameter",
        lambda d: d["countermeasures"].append({"name": "adaptive", "params": {"epoch": 3}}),
        "countermeasures[2].params: unknown key(s) 'epoch'; did you mean 'epochs'?",
    ),
    (
        "train_fraction above 1",
        lambda d: d["dataset"].update(train_fraction=1.5),
        "dataset.train_fraction must be in (0, 1), got 1.5",
    ),
    (
        "negative split seed",
        lambda d: d["dataset"].update(split_seed=-1),
        "dataset.split_seed must be >= 0, got -1",
    ),
    (
        "negative epsilon",
        lambda d: d["defenses"][1]["params"].update(epsilon=-0.1),
        "defenses[1].params.epsilon must be in (0, 1], got -0.1",
    ),
    ("seeds empty", lambda d: d.update(seeds=[]), "seeds: at least one seed is needed"),
    ("seed repeated", lambda d: d.update(seeds=[0, 1, 0]), "seeds[2]: 0 repeats seeds[0]"),
    (
        "confidence 1.0",
        lambda d: d.update(bootstrap={"confidence": 1.0}),
        "bootstrap.confidence must be in [0.5, 1), got 1.0",
    ),
    (
        "jpeg quality 0",
        lambda d: d["countermeasures"][1]["params"].update(quality=0),
        "countermeasures[1].params.quality must be in 1..100, got 0",
    ),
    (
        "duplicate labels",
        lambda d: d["defenses"][0].update(label="noise"),
        "defenses[1].label: label 'noise' repeats defenses[0] (a missing label defaults to the name)",
    ),
    (
        "boolean given as a string",
        lambda d: d.update(oblivious_only="yes"),
        "oblivious_only: expected true or false, got str 'yes'",
    ),
    ("device tpu", lambda d: d.update(device="tpu"), "device: 'tpu' is not one of 'auto', 'cpu', 'cuda'"),
    (
        "identities as a string",
        lambda d: d.update(protected={"identities": "alice"}),
        "protected.identities: expected a list or 'all', got str 'alice'",
    ),
    (
        "adaptation with apply_to",
        lambda d: d["countermeasures"].append({"name": "end-to-end", "apply_to": "both"}),
        "countermeasures[2].apply_to: 'end-to-end' is a model adaptation, not an input transform",
    ),
    (
        "azure service with the evasion protocol",
        lambda d: d.update(services=[{"kind": "azure"}], protocols=["poisoning", "evasion"]),
        "services[0]: an azure person group has no gallery search, so it cannot run the evasion protocol",
    ),
    (
        "dataset folder that does not exist",
        lambda d: d.update(dataset={"source": "folder", "path": "no/such/folder"}),
        "dataset.path: {root}/no/such/folder does not exist (a relative path is relative to the suite file)",
    ),
    (
        "protected identity not in the dataset",
        lambda d: _folder(d, identities=["alice", "nobody"]),
        "protected.identities[1]: 'nobody' is not an identity folder in {root}/faces "
        "(identities with 2+ photos: alice, bob)",
    ),
    (
        "protected identity with one photo",
        lambda d: _folder(d, identities=["carol"]),
        "protected.identities[0]: 'carol' has fewer than 2 image files in {root}/faces",
    ),
    (
        "protected count above the identities",
        lambda d: _folder(d, count=3),
        "protected.count: 3 asked for, but {root}/faces has only 2 identity folder(s) with 2+ image files",
    ),
]


def _faces(root: Path) -> None:
    """Identity folders with placeholder files: validation only lists names, it never reads an image."""
    for ident, n in (("alice", 2), ("bob", 2), ("carol", 1)):
        (root / "faces" / ident).mkdir(parents=True)
        for i in range(n):
            (root / "faces" / ident / f"{i}.png").write_bytes(b"")


def _write(tmp_path: Path, suite: str | Edit) -> Path:
    path = tmp_path / "suite.yaml"
    if isinstance(suite, str):
        path.write_text(suite, encoding="utf-8")
    else:
        data = copy.deepcopy(QUICK)
        suite(data)
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_cases_cover_at_least_fourteen_malformed_suites() -> None:
    assert len(CASES) >= 14
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "suite", "expected"), CASES, ids=[c[0] for c in CASES])
def test_malformed_suite_is_refused_with_file_key_and_problem(
    case: str, suite: str | Edit, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _faces(tmp_path)
    path = _write(tmp_path, suite)
    message = f"{path}: {expected.replace('{root}', str(tmp_path.resolve()))}"

    with pytest.raises(ConfigError) as caught:
        load_suite(path)
    assert message in str(caught.value)

    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cloakbench: error: ")
    assert message in captured.err

    run_dir = tmp_path / "run"
    assert main(["run", str(path), "--out", str(run_dir)]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not run_dir.exists()  # refused before any work started


def test_a_folder_suite_validates_from_names_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The dataset checks list the folder; the placeholder (empty) image files are never decoded."""
    _faces(tmp_path)
    path = _write(tmp_path, lambda d: _folder(d, identities=["alice", "bob"]))
    suite = load_suite(path)
    assert suite.dataset.path == (tmp_path / "faces").resolve()
    assert suite.protected.identities == ("alice", "bob")
    assert main(["validate", str(path)]) == EXIT_OK
    assert "valid suite 'quick'" in capsys.readouterr().out


@pytest.mark.parametrize("name", builtin_suites())
def test_builtin_suite_is_valid(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = builtin_suite_path(name)
    assert path is not None
    assert load_suite(path).name == name
    assert main(["validate", name]) == EXIT_OK
    assert f"valid suite {name!r}" in capsys.readouterr().out


def test_builtin_suites_are_the_repository_suites() -> None:
    shipped = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "suites").glob("*.yaml"))
    assert builtin_suites() == shipped
