"""Hardening of the results store and the files written from it (issue 18, items 7, 8, 9, 14):

- readers (``report``, ``export``) open the store read-only: nothing that records no run is turned into a store,
  and a good store's bytes never change under them, even when the file is read-only;
- a damaged store (truncated, random bytes, one page overwritten) is one clear line for ``run``, ``report`` and
  ``export``, naming the file and saying ``--fresh`` starts over;
- a full disk, while committing a task or while writing an output file, is one line that says so; the store keeps
  every task finished before it and the output file keeps its previous content;
- no CSV cell that a spreadsheet would run as a formula (identity names and labels are data);
- ``cloakbench bench --quiet`` prints nothing on stderr (not even the profiler's USDT lines).

One tiny real run (3 celeb24 identities x 6 photos, uniform noise at two budgets against SFace) is shared by the
module; every test that changes something works on a copy of it.
"""

from __future__ import annotations

import base64
import csv
import errno
import gc
import hashlib
import io
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cloakbench.bench.store import STORE_FILE, ResultsStore
from cloakbench.cache import overlay_cache
from cloakbench.cli import EXIT_BAD_INPUT, EXIT_OK, main

FORMULA = '=HYPERLINK("http://x")'
LABEL = "-noise"  # a defense label a spreadsheet would read as a formula
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Its own artifact cache (shared model files), set for the module's in-process runs."""
    root = overlay_cache(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLOAKBENCH_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, celeb24_root: Path, cache: Path) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("tiny")
    faces = work / "faces"
    for folder in ("Barack_Obama", "Drew_Barrymore", "Halle_Berry"):
        (faces / folder).mkdir(parents=True)
        for src in sorted((celeb24_root / folder).iterdir())[:6]:
            shutil.copy2(src, faces / folder / src.name)
    names = work / "names.csv"
    with names.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["folder", "name"], ["Barack_Obama", FORMULA]])
    suite = {
        "name": "tiny",
        "dataset": {"source": "folder", "path": str(faces), "names": str(names)},
        "protected": {"identities": [FORMULA]},
        "defenses": [
            {"name": "noise", "label": LABEL},
            {"name": "noise", "label": "noise-2", "params": {"epsilon": 0.02}},
        ],
        "recognizers": ["sface"],
        "countermeasures": ["none"],
        "classifiers": ["nearest-neighbour"],
        "bootstrap": {"resamples": 50},
    }
    suite_path = work / "suite.yaml"
    suite_path.write_text(yaml.safe_dump(suite))
    run = work / "run"
    assert main(["run", str(suite_path), "--out", str(run), "--quiet"]) == EXIT_OK
    assert not (run / f"{STORE_FILE}-wal").exists()  # the last close checkpointed: the store is one file
    return {"suite": suite_path, "run": run, "store": run / STORE_FILE}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(err: str) -> str:
    """The single line a refused command printed (no traceback)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cloakbench: error: "), err
    return lines[0]


def _copy_run(tiny: dict[str, Path], dest: Path) -> Path:
    shutil.copytree(tiny["run"], dest)
    return dest


def _table(path: Path, table: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        db.close()


# -- item 7: readers open the store read-only --------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "report"])
def test_readers_refuse_what_records_no_run_and_change_nothing(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty" / STORE_FILE
    empty.parent.mkdir()
    empty.touch()
    schema_only = tmp_path / "schema-only" / STORE_FILE  # a store some process opened, into which no run went
    ResultsStore(schema_only).close()
    text = tmp_path / "notes.txt"
    text.write_text("")  # an empty file by another name
    for target in (empty, schema_only, text):
        before = _sha(target)
        out = tmp_path / f"out-{target.parent.name}-{target.name}"
        assert main([command, str(target), "--out", str(out)]) == EXIT_BAD_INPUT, target
        line = _one_line(capsys.readouterr().err)
        assert str(target) in line and "records no run" in line, line
        assert _sha(target) == before, f"{command} changed {target}"
        assert not out.exists(), f"{command} wrote {out} from a store with no run"
        if target is not schema_only:  # (a WAL reader's empty -wal/-shm files are SQLite's, and harmless)
            assert not list(target.parent.glob(f"{target.name}-*")), "a journal file was left beside it"
    missing = tmp_path / "missing" / STORE_FILE
    assert main([command, str(missing), "--out", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    line = _one_line(capsys.readouterr().err)
    assert str(missing) in line and "no results store" in line, line
    assert not missing.parent.exists()


def test_readers_leave_a_good_store_byte_for_byte_and_read_a_read_only_one(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    store = folder / STORE_FILE
    shutil.copy2(tiny["store"], store)
    db = sqlite3.connect(store)
    assert db.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"  # so a switch to WAL would show
    db.close()
    before = _sha(store)
    store.chmod(0o444)
    folder.chmod(0o555)  # an archived run: neither the file nor its folder can be written (bites as non-root)
    try:
        assert main(["export", str(store), "--out", str(tmp_path / "export"), "--format", "csv"]) == EXIT_OK
        assert main(["report", str(store), "--out", str(tmp_path / "report"), "--figures", "none"]) == EXIT_OK
    finally:
        folder.chmod(0o755)
        store.chmod(0o644)
    capsys.readouterr()
    assert _sha(store) == before, "a reader changed the store (schema, journal mode or data)"
    assert store.read_bytes()[18:20] == b"\x01\x01", "a reader switched the store to WAL"
    assert sorted(p.name for p in folder.iterdir()) == [STORE_FILE]
    with (tmp_path / "export" / "cells.csv").open(newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(_table(tiny["store"], "cells")) == 2
    assert (tmp_path / "report" / "report.html").is_file()


def test_readers_read_a_store_on_a_read_only_file_system(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An archived run on a read-only mount: SQLite cannot create the -shm file a WAL reader needs, so the reader
    opens the checkpointed file as immutable. Needs root to bind-mount (skipped elsewhere: chmod does not bind
    root, and a non-root user cannot mount)."""
    source, mount = tmp_path / "source", tmp_path / "mount"
    source.mkdir()
    mount.mkdir()
    shutil.copy2(tiny["store"], source / STORE_FILE)
    assert (source / STORE_FILE).read_bytes()[18:20] == b"\x02\x02"  # a WAL store, as every run leaves it
    mounted = subprocess.run(["mount", "--bind", str(source), str(mount)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(mount)], capture_output=True, check=False)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.decode(errors='replace').strip()}")
        assert main(["report", str(mount), "--out", str(tmp_path / "report"), "--figures", "none"]) == EXIT_OK
        assert main(["export", str(mount), "--out", str(tmp_path / "export"), "--format", "csv"]) == EXIT_OK
        assert sorted(p.name for p in mount.iterdir()) == [STORE_FILE]
    finally:
        gc.collect()  # a reader that failed may still hold the file open through its traceback
        subprocess.run(["umount", "--lazy", str(mount)], check=True)
    capsys.readouterr()
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "export" / "cells.csv").is_file()


# -- item 8: a damaged store is one clear line --------------------------------------------------------------


def _corrupt(store: Path, how: str) -> None:
    data = store.read_bytes()
    rng = np.random.default_rng(18)
    if how == "truncated":
        store.write_bytes(data[: len(data) // 3])
    elif how == "random":
        store.write_bytes(rng.bytes(len(data)))
    else:  # the root page of the cells table overwritten with random bytes
        page = int.from_bytes(data[16:18], "big")
        db = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True)
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'cells'").fetchone()[0]
        db.close()
        b = bytearray(data)
        b[(root - 1) * page : root * page] = rng.bytes(page)
        store.write_bytes(bytes(b))


@pytest.mark.parametrize("how", ["truncated", "random", "page"])
def test_a_damaged_store_is_one_clear_line_for_run_report_and_export(
    how: str, tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy_run(tiny, tmp_path / "run")
    store = run / STORE_FILE
    _corrupt(store, how)
    damaged = _sha(store)
    summary = (run / "summary.csv").read_bytes()
    commands = {
        "run": ["run", str(tiny["suite"]), "--out", str(run), "--quiet"],
        "report": ["report", str(run), "--out", str(tmp_path / "report"), "--figures", "none"],
        "export": ["export", str(run), "--out", str(tmp_path / "export")],
    }
    for name, argv in commands.items():
        assert main(argv) == EXIT_BAD_INPUT, name
        line = _one_line(capsys.readouterr().err)
        assert str(store) in line, (name, line)
        assert "not a cloakbench results store, or it is damaged" in line, (name, line)
        assert "--fresh" in line, (name, line)
        assert _sha(store) == damaged, f"{name} wrote into the damaged store"
    assert (run / "summary.csv").read_bytes() == summary  # the CSVs of the run are still there
    assert not (tmp_path / "report").exists() and not (tmp_path / "export").exists()


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ("UPDATE cells SET protection_rate = 1.5", "table cells, column protection_rate"),
        ("UPDATE queries SET rank = 'first'", "table queries, column rank"),
        ("UPDATE grids SET png = X'474946383961'", "is not a PNG image"),  # a GIF header: Pillow would open it
        ("UPDATE run SET value = '{not json' WHERE key = 'plan'", "run key 'plan' holds no JSON value"),
    ],
)
def test_an_edited_store_is_refused_not_reported(
    edit: str, says: str, tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The store is not authenticated: valid SQL can put anything in it. What cannot be a stored result (a rate
    outside [0, 1], text for a number, a grid that is no PNG, a run value that is no JSON) stops the reader."""
    store = tmp_path / STORE_FILE
    shutil.copy2(tiny["store"], store)
    db = sqlite3.connect(store)
    db.execute(edit)
    db.commit()
    db.close()
    readers = [["report", str(store), "--figures", "none"], ["export", str(store), "--format", "csv"]]
    for argv in readers[:1] if "grids" in edit else readers:  # (export leaves the grids out)
        assert main(argv) == EXIT_BAD_INPUT, argv
        line = _one_line(capsys.readouterr().err)
        assert str(store) in line and says in line, line
    assert not (tmp_path / "report").exists() and not (tmp_path / "export").exists()


# -- item 9: a full disk --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "output"), [("run", "summary.csv"), ("report", "report.html"), ("export", "cells.csv")]
)
def test_disk_full_while_writing_an_output_keeps_the_old_file_and_the_store(
    command: str, output: str, tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    run = _copy_run(tiny, tmp_path / "run")
    argv = {
        "run": ["run", str(tiny["suite"]), "--out", str(run), "--quiet"],
        "report": ["report", str(run), "--figures", "none"],
        "export": ["export", str(run), "--format", "csv"],
    }[command]
    assert main(argv) == EXIT_OK  # the good files a full disk must not spoil
    capsys.readouterr()
    target = next(p for p in run.rglob(output))
    good = target.read_bytes()
    tasks = _table(run / STORE_FILE, "tasks")
    cells = _table(run / STORE_FILE, "cells")

    real_write = Path.write_bytes

    def write_bytes(self: Path, data: Any) -> int:  # the disk fills up halfway through this one file
        if self.name.startswith(f".{output}.") and self.name.endswith(".tmp"):
            with self.open("wb") as fh:
                fh.write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert main(argv) == EXIT_BAD_INPUT
    line = _one_line(capsys.readouterr().err)
    assert "the disk is full" in line and str(target) in line, line
    assert "results store" in line and "intact" in line, line
    monkeypatch.undo()
    assert target.read_bytes() == good, "a full disk left a half-written file in place of a good one"
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"
    assert _table(run / STORE_FILE, "tasks") == tasks and _table(run / STORE_FILE, "cells") == cells


def test_disk_full_while_committing_keeps_every_finished_task(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite itself runs out of room (``max_page_count`` caps the file at its size) in the second cloak task's
    commit (its grid image needs new pages): the first task stays committed, the second leaves no row, and the
    same command afterwards finishes the run."""
    out = tmp_path / "run"
    real_commit = ResultsStore.commit
    calls: list[str] = []

    def commit(self: ResultsStore, result: Any, *, attempt: int) -> bool:
        calls.append(result.task.key)
        if len(calls) == 2:
            pages = self._db.execute("PRAGMA page_count").fetchone()[0]
            self._db.execute(f"PRAGMA max_page_count = {pages}")
        return real_commit(self, result, attempt=attempt)

    monkeypatch.setattr(ResultsStore, "commit", commit)
    argv = ["run", str(tiny["suite"]), "--out", str(out), "--quiet"]
    assert main(argv) == EXIT_BAD_INPUT
    line = _one_line(capsys.readouterr().err)
    store = out / STORE_FILE
    assert "the disk is full" in line and str(store) in line and "intact" in line, line
    assert len(calls) == 2
    tasks = _table(store, "tasks")
    assert [(t[0], t[5]) for t in tasks] == [(calls[0], "ok")], tasks
    assert {r[0] for r in _table(store, "cloaks")} == {calls[0]}, "rows of the task whose commit failed are stored"
    assert _table(store, "cells") == []
    db = sqlite3.connect(f"{store.resolve().as_uri()}?mode=ro", uri=True)
    assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    db.close()
    monkeypatch.undo()
    assert main(argv) == EXIT_OK  # the store was intact: the run resumes and finishes
    assert [t[0] for t in _table(store, "tasks")][:2] == calls


# -- item 14: no formula in any CSV; bench --quiet is quiet ------------------------------------------------------


def _assert_no_formula(name: str, text: str) -> int:
    cells = 0
    for row in csv.reader(io.StringIO(text, newline="")):
        for cell in row:
            if cell.startswith(FORMULA_START):
                try:
                    float(cell)  # a negative number is a number, not a formula
                except ValueError:
                    pytest.fail(f"{name}: the cell {cell!r} would run as a spreadsheet formula")
            cells += 1
    return cells


def test_no_csv_cell_is_a_spreadsheet_formula(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tiny["run"]
    assert main(["export", str(run), "--out", str(tmp_path / "export"), "--format", "csv"]) == EXIT_OK
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--figures", "none"]) == EXIT_OK
    capsys.readouterr()
    files = {p: p.read_text(encoding="utf-8") for p in [*run.glob("*.csv"), *tmp_path.rglob("*.csv")]}
    html = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    downloads = re.findall(r'href="data:text/csv;charset=utf-8;base64,([^"]+)"', html)
    assert downloads, "the HTML report has no CSV downloads"
    for i, b64 in enumerate(downloads):
        files[Path(f"report.html#csv{i}")] = base64.b64decode(b64).decode("utf-8")
    for path, text in files.items():
        _assert_no_formula(str(path), text)
    # the name and the label are still there, made inert by OWASP's leading quote
    cells = {p: {c for r in csv.reader(io.StringIO(text, newline="")) for c in r} for p, text in files.items()}
    for name in ("queries.csv", "cloaks.csv", "manifest.csv"):
        assert f"'{FORMULA}" in cells[run / name], name
    assert f"'{LABEL}" in cells[run / "summary.csv"] and f"'{LABEL}" in cells[tmp_path / "export" / "cells.csv"]
    assert f"'{FORMULA}" in cells[tmp_path / "report" / "tables" / "identities.csv"]
    assert any(f"'{FORMULA}" in c for p, c in cells.items() if str(p).startswith("report.html#"))


def test_report_csv_keeps_negative_numbers_and_neutralises_text() -> None:
    from cloakbench.reports.render import Column, Estimate, Table, to_csv

    table = Table(
        name="t", title="T", caption="c",
        columns=(Column(key="who", header="who", numeric=False), Column(key="x", header="x")),
        rows=({"who": "@SUM(A1)", "x": -0.25}, {"who": "+1", "x": Estimate(-0.5, -0.75, 0.0)}, {"who": "a", "x": -3}),
    )  # fmt: skip
    rows = list(csv.reader(io.StringIO(to_csv(table))))
    assert rows[1:] == [["'@SUM(A1)", "-0.25", "", ""], ["'+1", "-0.5", "-0.75", "0.0"], ["a", "-3", "", ""]]


def test_bench_quiet_prints_no_profiler_lines(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The profiler (kineto, C++) writes ``USDT: ... profiler_start/stop`` straight to file descriptor 2; with
    ``--quiet`` none of it reaches stderr. Only the JPEG target runs (the cheapest), through the real CLI."""
    import cloakbench.bench.timing_suite as timing_suite

    real = timing_suite.build_targets

    def jpeg_only(*args: Any, **kwargs: Any) -> Any:
        targets, skipped = real(*args, **kwargs)
        return [t for t in targets if t.kind == "transform"], skipped

    monkeypatch.setattr(timing_suite, "build_targets", jpeg_only)
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--repeats", "1", "--warmup", "0", "--out", str(out), "--quiet"]) == EXIT_OK
    captured = capfd.readouterr()
    assert "USDT" not in captured.err and "profiler_st" not in captured.err, captured.err
    assert captured.out == ""
    assert _table(out / STORE_FILE, "bench_kernels"), "the profiler ran and its rows were stored"
