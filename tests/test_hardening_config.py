"""Hostile suite files (issue 18): each is refused before any work with exit code 2 and one short line.

A suite file is untrusted input: its name must not steer the run folder out of ``runs/``; deep nesting, alias
bombs, non-string keys, bytes that are not UTF-8, integers no store or generator can hold and numbers that are
not finite must each give one clear line naming the file and the key, never a traceback, a hang or a run that
reports nonsense. The suites use three celeb24 identities (4 photos each, linked, not copied) so that a suite
the checks let through would really run.
"""

from __future__ import annotations

import dataclasses
import math
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from cloakbench.cli import EXIT_BAD_INPUT, EXIT_OK, main
from cloakbench.config import build
from cloakbench.errors import ConfigError

LINES = {
    "name": "q",
    "dataset": "{source: folder, path: faces, max_per_identity: 4}",
    "protected": "{count: 1}",
    "defenses": "[noise]",
    "recognizers": "[sface]",
    "classifiers": "[nearest-neighbour]",
}
"""A small valid suite, one key a line (lines 1 to 6 in this order); keys not in it are added after line 6."""


def _text(**values: str) -> str:
    """The suite of :data:`LINES` with ``values`` (YAML text) replacing or adding top-level keys."""
    return "".join(f"{k}: {v}\n" for k, v in {**LINES, **values}.items())


@pytest.fixture
def folder(celeb24_root: Path, tmp_path: Path) -> Path:
    """``tmp_path/suites/`` with a ``faces`` dataset beside where the suite files go."""
    suites = tmp_path / "suites"
    (suites / "faces").mkdir(parents=True)
    for ident in sorted(p for p in celeb24_root.iterdir() if p.is_dir())[:3]:
        (suites / "faces" / ident.name).symlink_to(ident, target_is_directory=True)
    return suites


def _write(folder: Path, text: str | bytes, name: str = "suite.yaml") -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _refused(path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``cloakbench run`` on the suite; it must exit 2 with one ``cloakbench: error:`` line; returns it."""
    out = path.parent / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet", *argv]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cloakbench: error: "), captured.err[:2000]
    assert len(lines[0]) < 500  # short enough to read
    assert not out.exists()  # refused before any work started
    return lines[0]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ---------------------------------------------------------------- item 6: the suite name and the run folder


@pytest.mark.parametrize("name", ["../../x", "{tmp}/abs/path", "..", "a/b", "runs\\x", "-x", " x", "x" * 101])
def test_a_suite_name_that_is_no_safe_folder_name_is_refused(
    name: str, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``runs/<name>`` is the default run folder: a name that is a path would write (and ``--fresh`` delete) there."""
    name = name.replace("{tmp}", str(tmp_path))
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    dataset = LINES["dataset"].replace("path: faces", f"path: {folder / 'faces'}")
    path = _write(folder, _text(name=repr(name), dataset=dataset))
    before = _files(tmp_path)

    assert main(["run", str(path), "--quiet", "--fresh"]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err[:2000]
    assert lines[0].startswith(f"cloakbench: error: {path}: name must be 1 to 100 ASCII letters, digits, ")
    assert "'.', '_' or '-', starting with a letter or digit" in lines[0]
    assert "--out" in lines[0]
    assert _files(tmp_path) == before  # nothing written anywhere: not in runs/, not outside it
    assert main(["validate", str(path)]) == EXIT_BAD_INPUT
    capsys.readouterr()


def test_a_slug_name_still_names_the_run_folder(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(folder, _text(name="My_suite-2.1"))
    assert main(["run", str(path), "--dry-run", "--json"]) == EXIT_OK
    assert f'"run_dir": "{tmp_path / "runs" / "My_suite-2.1"}"' in capsys.readouterr().out


# ---------------------------------------------------------------- item 9: shapes YAML allows and suites do not


@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_yaml_nested_thousands_of_levels_deep_is_refused(
    opener: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    closer = "]" if opener == "[" else "}"
    path = _write(folder, _text(description=opener * 20000 + "1" + closer * 20000))
    line = _refused(path, capsys)
    assert f"{path}: line 7, column " in line
    assert "nested more than 50 levels deep" in line


@pytest.mark.parametrize(
    ("key", "shown"), [("true", "bool true"), ("1", "int 1"), ("null", "null"), ("[a]", "list"), ("1.5", "float 1.5")]
)
@pytest.mark.parametrize("where", ["top", "params"])
def test_a_key_that_is_not_a_string_is_refused(
    key: str, shown: str, where: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "top":
        text, at = _text(**{key: "1"}), "line 7, column 1"
    else:
        text, at = _text(defenses=f"[{{name: noise, params: {{{key}: 1}}}}]"), "line 4, column 35"
    path = _write(folder, text)
    line = _refused(path, capsys)
    assert f"{path}: {at}: a key must be a string, got {shown}" in line


def test_build_names_a_key_that_is_not_a_string() -> None:
    """Mappings built in code (not read from YAML) get the same one-line error, not a TypeError."""
    from cloakbench.bench.suite import parse_suite

    data: dict[Any, Any] = {"name": "q", "defenses": ["noise"], "recognizers": ["sface"], True: 1, 2: 2}
    with pytest.raises(
        ConfigError, match=r"^s\.yaml: key\(s\) 2, True are not strings \(keys are names such as 'name'; "
    ):
        parse_suite(data, where="s.yaml")


def test_a_suite_file_that_is_not_utf8_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _text(description="café").encode("latin-1")
    path = _write(folder, text)
    line = _refused(path, capsys)
    offset = text.index(b"\xe9")
    assert line == (
        f"cloakbench: error: {path}: line 7, column 17: not UTF-8 text (byte 0xe9 at offset {offset}); "
        "save the suite file as UTF-8"
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "seeds: [36893488147419103232]",
            "seeds[0]: 36893488147419103232 is out of range (at most 9223372036854775807)",
        ),
        ("seeds: [9223372036854775808]", "seeds[0]: 9223372036854775808 is out of range (at most 9223372036854775807)"),
        ("seeds: [-1]", "seeds[0] must be in 0..9223372036854775807, got -1"),
        (
            "seeds: [" + "9" * 5000 + "]",
            "line 7, column 9: an integer of 5000 digits; the largest a suite takes is 9223372036854775807",
        ),
        (
            "dataset: {source: folder, path: faces, split_seed: 18446744073709551616}",
            "dataset.split_seed: 18446744073709551616 is out of range (at most 9223372036854775807)",
        ),
    ],
)
def test_an_integer_no_store_or_generator_holds_is_refused_before_any_cloak(
    setting: str, message: str, folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """2**65 as a seed used to be cloaked with and then crash the results store (SQLite holds 64-bit integers)."""
    import cloakbench.bench.runner as runner

    cloaked: list[object] = []
    real = runner.cloak_all
    monkeypatch.setattr(runner, "cloak_all", lambda *a, **k: cloaked.append(a) or real(*a, **k))
    key, value = setting.split(": ", 1)
    path = _write(folder, _text(**{key: value}))
    line = _refused(path, capsys)
    assert f"{path}: {message}" in line
    assert cloaked == []


def test_an_integer_parameter_out_of_the_64_bit_range_is_refused(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(folder, _text(defenses="[{name: pgd, params: {steps: 1180591620717411303424}}]"))
    line = _refused(path, capsys)
    assert (
        f"{path}: defenses[0].params.steps: 1180591620717411303424 is out of range (at most 9223372036854775807)"
        in line
    )


def test_a_path_with_a_nul_byte_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(folder, _text(dataset='{source: folder, path: "fa\\0ces"}'))
    line = _refused(path, capsys)
    assert f"{path}: dataset.path: a path cannot hold a NUL character, got 'fa\\x00ces'" in line


# ---------------------------------------------------------------- item 10: alias bombs and huge values in messages


def _bomb(levels: int = 9) -> str:
    """A flow list whose last item expands to 10**levels scalars through anchors and aliases."""
    parts = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    parts += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("key", ["name", "description", "recognizers"])
def test_a_billion_laughs_suite_is_refused_quickly_in_little_memory(
    key: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(folder, _text(**{key: _bomb()}))
    tracemalloc.start()
    start = time.perf_counter()
    try:
        line = _refused(path, capsys)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{path}: line " in line
    assert "expands to more than 100000 values (YAML aliases count each time they are used)" in line
    assert seconds < 2.0
    assert peak < 50 * 2**20


def test_an_alias_that_contains_itself_is_refused(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(folder, _text(description="&a [1, *a]"))
    line = _refused(path, capsys)
    assert f"{path}: line 7, column 14: the value refers to itself (a YAML alias inside its own anchor)" in line


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("name: [" + ", ".join(["abcdefghij"] * 5000) + "]", "name: expected a string, got list ['abcdefghij', "),
        ("device: " + "x" * 9000, "device: 'xxxxxxxx"),
        ("recognizers: [" + "y" * 9000 + "]", "recognizers[0]: unknown recognizer 'yyyyyyy"),
    ],
)
def test_a_huge_value_is_quoted_short_in_the_error(
    setting: str, expected: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, value = setting.split(": ", 1)
    path = _write(folder, _text(**{key: value}))
    line = _refused(path, capsys)
    assert expected in line and "..." in line


def test_quote_bounds_what_a_message_shows() -> None:
    from cloakbench.config import quote

    assert quote("abc") == "'abc'"
    assert quote({"name": "pgd"}) == "{'name': 'pgd'}"
    assert len(quote("z" * 10**6)) <= 80 and "..." in quote("z" * 10**6)
    assert len(quote(list(range(10**6)))) <= 80
    assert quote(10**5000) == "an integer of 5001 digits"
    nested: list[Any] = []
    nested.append(nested)
    assert len(quote(nested)) <= 80


# ---------------------------------------------------------------- item 11: numbers that are not finite


@pytest.mark.parametrize("rate", ["1.0e-300", "0", "1.0e+300"])
def test_a_rate_limit_is_a_rate_a_service_can_have(rate: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """1e-300 requests per second validated, then waited for ever (or crashed the sleep) at run time."""
    path = _write(folder, _text(services=f"[{{kind: rekognition, rate_limit_per_s: {rate}}}]"))
    line = _refused(path, capsys)
    expected = f"{path}: services[0].rate_limit_per_s must be in [0.01, 1e6] requests per second (null: no limit)"
    assert expected in line


@pytest.mark.parametrize("number", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"defenses": "[{name: fawkes-high, params: {penalty: %s}}]"}, "defenses[0].params.penalty"),
        ({"defenses": "[{name: lowkey, params: {blur_sigma: %s}}]"}, "defenses[0].params.blur_sigma"),
        ({"defenses": "[{name: pgd, params: {epsilon: %s}}]"}, "defenses[0].params.epsilon"),
        ({"defenses": "[{name: noise, cloak_fraction: %s}]"}, "defenses[0].cloak_fraction"),
        ({"services": "[{kind: rekognition, rate_limit_per_s: %s}]"}, "services[0].rate_limit_per_s"),
        ({"clean_accuracy_floor": "%s"}, "clean_accuracy_floor"),
        ({"countermeasures": "[{name: blur, params: {sigma: %s}}]"}, "countermeasures[0].params.sigma"),
    ],
)
def test_a_number_that_is_not_finite_is_refused(
    number: str, settings: dict[str, str], key: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(folder, _text(**{k: v % number for k, v in settings.items()}))
    line = _refused(path, capsys)
    shown = {".inf": "inf", "-.inf": "-inf", ".nan": "nan"}[number]
    assert f"{path}: {key}: expected a finite number, got {shown}" in line


def test_a_field_may_allow_infinity_explicitly() -> None:
    from cloakbench.config import ALLOW_INFINITE

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class _Limits:
        timeout_s: float = dataclasses.field(default=math.inf, metadata=ALLOW_INFINITE)
        rate: float = 1.0

    assert build(_Limits, {"timeout_s": math.inf}, where="x").timeout_s == math.inf
    with pytest.raises(ConfigError, match=r"^x: timeout_s: expected a number \(or \.inf\), got nan$"):
        build(_Limits, {"timeout_s": math.nan}, where="x")
    with pytest.raises(ConfigError, match=r"^x: rate: expected a finite number, got inf$"):
        build(_Limits, {"rate": math.inf}, where="x")


def test_a_suite_on_folders_that_differ_only_in_normalisation_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dataset's refusal reaches the user as the suite's one line (file, key, problem), and protected
    identities given in NFD match their NFC folder."""
    import unicodedata

    from PIL import Image

    root = tmp_path / "faces"
    for name in ("Ana", unicodedata.normalize("NFD", "José")):
        (root / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (40, 40), (k * 40, 90, 120)).save(root / name / f"{k}.png")
    suite = (
        f"name: t\ndataset: {{source: folder, path: {root}}}\nrecognizers: [sface]\ndefenses: [noise]\n"
        f"protected: {{identities: [{unicodedata.normalize('NFD', 'José')}]}}\n"
    )
    path = _write(tmp_path, suite)
    assert main(["validate", str(path)]) == 0  # the NFD name in the suite is the NFC identity
    capsys.readouterr()
    (root / unicodedata.normalize("NFC", "José")).mkdir()
    for k in range(2):
        Image.new("RGB", (40, 40), (k * 40, 90, 120)).save(root / unicodedata.normalize("NFC", "José") / f"{k}.png")
    line = _refused(path, capsys)
    assert f"{path}: dataset.path:" in line and "differ only in Unicode normalisation" in line
