"""The runner as a product, end to end through the CLI on celeb24 with real models:

- a run killed with SIGKILL three times at different points, then started again, ends with the same store as
  an uninterrupted run (the exported tables compared row by row) and never redoes a committed task;
- a corrupt model file fails its own cells only, and a rerun retries just those;
- the same suite spread over a local Ray cluster (loopback) gives the same rows as the in-process run.

Each run gets its own artifact cache (model files shared), so every cloak and embedding is computed by the
run that reports it.
"""

from __future__ import annotations

import csv
import math
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloakbench.bench.export import export_store
from cloakbench.bench.store import MEASURED_COLUMNS
from cloakbench.cache import overlay_cache
from cloakbench.cli import EXIT_CELLS_FAILED, EXIT_OK, main

ROW_TABLES = ("cells", "queries", "cloaks", "adaptations")


def suite_file(root: Path, celeb24: Path, recognizers: list[str]) -> Path:
    suite = {
        "name": "runs-test",
        "dataset": {"source": "folder", "path": str(celeb24), "max_per_identity": 5},
        "protected": {"identities": ["Halle_Berry", "Tina_Fey"]},
        "defenses": [{"name": "pgd", "params": {"steps": 3}}, "noise"],
        "recognizers": recognizers,
        "countermeasures": ["none", {"name": "jpeg", "label": "jpeg-75", "params": {"quality": 75}},
                            {"name": "blur", "label": "blur-1", "params": {"sigma": 1.0}}],
        "bootstrap": {"resamples": 200},
    }  # fmt: skip
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def run_cli(args: list[str], cache: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    with monkeypatch.context() as m:
        m.setenv("CLOAKBENCH_CACHE", str(cache))
        return main(args)


def exported(results: Path, out: Path) -> dict[str, list[dict[str, str]]]:
    export_store(results, out, ["csv"])
    tables = {}
    for table in (*ROW_TABLES, "tasks", "timings"):
        with (out / f"{table}.csv").open() as f:
            tables[table] = list(csv.DictReader(f))
    return tables


def results_only(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in MEASURED_COLUMNS} for r in rows]


def close(a: str, b: str, tol: float) -> bool:
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=tol, abs_tol=tol)
    except ValueError:
        return False


@pytest.fixture(scope="module")
def uninterrupted(celeb24_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("uninterrupted")
    suite = suite_file(root, celeb24_root, ["sface"])
    cache = overlay_cache(root / "cache")
    env_before = os.environ.get("CLOAKBENCH_CACHE")
    os.environ["CLOAKBENCH_CACHE"] = str(cache)
    try:
        code = main(["run", str(suite), "--out", str(root / "run"), "--quiet"])
    finally:
        if env_before is None:
            del os.environ["CLOAKBENCH_CACHE"]
        else:
            os.environ["CLOAKBENCH_CACHE"] = env_before
    assert code == EXIT_OK
    return {"suite": suite, "tables": exported(root / "run", root / "export"), "out": root / "run", "cache": cache}


def _committed(store: Path) -> int:
    if not store.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0


def _kill_when(cmd: list[str], env: dict[str, str], store: Path, *, tasks: int, extra_s: float) -> int:
    """Start a run, SIGKILL it ``extra_s`` seconds after ``tasks`` tasks are committed; return how many were."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while _committed(store) < tasks:
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {tasks} tasks were committed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(extra_s)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    return _committed(store)


def test_three_sigkills_then_resume_equal_an_uninterrupted_run(
    uninterrupted: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    cache = overlay_cache(tmp_path / "cache")
    env = {**os.environ, "CLOAKBENCH_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "cloakbench.cli", "run", str(uninterrupted["suite"]), "--out", str(out), "--quiet"]
    store = out / "results.sqlite"
    seen = [
        _kill_when(cmd, env, store, tasks=0, extra_s=4.0),  # during start-up or the first cloak
        _kill_when(cmd, env, store, tasks=2, extra_s=0.0),  # right after the cloaks
        _kill_when(cmd, env, store, tasks=3, extra_s=1.0),  # inside an evaluate task
    ]
    assert seen[-1] < 5, f"the third kill came too late to test anything: {seen}"
    assert run_cli(["run", str(uninterrupted["suite"]), "--out", str(out), "--quiet"], cache, monkeypatch) == EXIT_OK

    resumed = exported(out, tmp_path / "export")
    for table in ROW_TABLES:
        assert results_only(resumed[table]) == results_only(uninterrupted["tables"][table]), table
    tasks = resumed["tasks"]
    assert len(tasks) == len({t["task_key"] for t in tasks}) == 5
    # every task ran exactly once: the attempt that committed it; later attempts never touched it
    attempts = {t["task_key"]: int(t["attempt_id"]) for t in tasks}
    assert len(set(attempts.values())) >= 2, attempts
    with sqlite3.connect(store) as db:
        statuses = [r[0] for r in db.execute("SELECT status FROM attempts ORDER BY id")]
    # the killed attempts stay "running" (the first kill may strike before its attempt row exists)
    assert statuses[-1] == "finished" and set(statuses[:-1]) == {"running"} and len(statuses) >= 3, statuses
    # cached work was not recomputed: evaluate tasks that ran after the cloak tasks' attempt made no cloak
    cloaked_in = max(attempts[k] for k in attempts if k.startswith("cloak/"))
    stages = {(r["task_key"], r["stage"]) for r in resumed["timings"]}
    for key, attempt in attempts.items():
        if key.startswith("evaluate/") and attempt > cloaked_in:
            assert (key, "cloaking") not in stages, key


def test_a_corrupt_model_fails_its_cells_only(
    celeb24_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib
    import json

    from cloakbench.attacks.recognizers.facenet import casia_state_dict_path
    from cloakbench.fetch import conversion_record_path

    # a corrupt file whose record matches it (a mismatched one is simply converted again): it cannot be repaired
    bad = b"not a torch checkpoint"
    record = conversion_record_path(casia_state_dict_path())
    casia = casia_state_dict_path().name
    doc = {**json.loads(record.read_text()), "sha256": hashlib.sha256(bad).hexdigest()}
    cache = overlay_cache(tmp_path / "cache", replace={casia: bad, record.name: json.dumps(doc).encode()})
    suite = suite_file(tmp_path, celeb24_root, ["sface", "facenet-casia"])
    out = tmp_path / "run"
    assert run_cli(["run", str(suite), "--out", str(out), "--quiet"], cache, monkeypatch) == EXIT_CELLS_FAILED
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    by_rec = {rec: [r for r in rows if r["recognizer"] == rec] for rec in ("sface", "facenet-casia")}
    assert len(by_rec["sface"]) == len(by_rec["facenet-casia"]) == 12  # 2 defenses x 3 countermeasures x 2
    assert all(r["status"] == "ok" and r["protection_rate"] != "" for r in by_rec["sface"])
    assert all(r["status"] == "failed" for r in by_rec["facenet-casia"])
    assert all(f"{casia}: the cached converted model cannot be read" in r["note"] for r in by_rec["facenet-casia"])
    # a rerun retries the three failed tasks only (they fail again: the file is still corrupt)
    with monkeypatch.context() as m:
        m.setenv("CLOAKBENCH_CACHE", str(cache))
        m.setattr(sys, "stdout", open(os.devnull, "w"))  # noqa: SIM115
        code = main(["run", str(suite), "--out", str(out), "--json"])
    assert code == EXIT_CELLS_FAILED
    with sqlite3.connect(out / "results.sqlite") as db:
        last = db.execute("SELECT MAX(id) FROM attempts").fetchone()[0]
        rerun = [r[0] for r in db.execute("SELECT task_key FROM tasks WHERE attempt_id = ?", (last,))]
    assert sorted(rerun) == sorted(f"evaluate/0/facenet-casia/{c}" for c in ("none", "jpeg-75", "blur-1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    # token authentication (Ray's default once ~/.ray/auth_token exists) with a token of this test's own, for the
    # head (`ray start` inherits the environment) and for our driver; Ray reads both when it is first imported
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    pytest.importorskip("ray", reason="Ray is part of the test dependencies (scripts/install.sh --test)")
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = _free_port()
    start = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"]  # fmt: skip
    subprocess.run(start, check=True, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
        del os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN"]


def test_ray_on_a_local_cluster_gives_the_in_process_rows(
    uninterrupted: dict[str, Any], ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    cache = overlay_cache(tmp_path / "cache")
    args = ["run", str(uninterrupted["suite"]), "--out", str(out), "--quiet", "--executor", "ray",
            "--address", ray_cluster, "--workers", "2"]  # fmt: skip
    assert run_cli(args, cache, monkeypatch) == EXIT_OK
    spread = exported(out, tmp_path / "export")
    workers = {t["worker"] for t in spread["tasks"]}
    assert len(workers) == 2 and all(":" in w for w in workers), workers  # two actors, not the driver
    for table in ROW_TABLES:
        ours, theirs = results_only(spread[table]), results_only(uninterrupted["tables"][table])
        assert len(ours) == len(theirs), table
        for a, b in zip(ours, theirs, strict=True):
            assert a.keys() == b.keys()
            diff = {k: (a[k], b[k]) for k in a if not close(a[k], b[k], 1e-6)}
            assert not diff, (table, diff)


def test_resuming_with_other_code_warns(
    uninterrupted: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cloakbench.bench import metadata

    monkeypatch.setattr(metadata, "git_state", lambda: {"commit": "0" * 40, "dirty": False})
    args = ["run", str(uninterrupted["suite"]), "--out", str(uninterrupted["out"]), "--quiet"]
    with caplog.at_level("WARNING", logger="cloakbench.bench.executors"):
        assert run_cli(args, uninterrupted["cache"], monkeypatch) == EXIT_OK  # nothing left to do
    assert any("earlier attempts at this run used another cloakbench" in r.message for r in caplog.records)


def test_dry_run_lists_tasks_and_cells_and_runs_nothing(
    uninterrupted: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    fresh = tmp_path / "never"
    assert run_cli(["run", str(uninterrupted["suite"]), "--out", str(fresh), "--dry-run", "--json"],
                   uninterrupted["cache"], monkeypatch) == EXIT_OK  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    assert not fresh.exists()
    assert [t["task"] for t in plan["tasks"]] == [
        "cloak/0/pgd", "cloak/0/noise", "evaluate/0/sface/none", "evaluate/0/sface/jpeg-75", "evaluate/0/sface/blur-1"
    ]  # fmt: skip
    assert plan["cells"] == len(uninterrupted["tables"]["cells"]) == 12  # 3 countermeasures x 2 classifiers x 2
    assert {t["state"] for t in plan["tasks"]} == {"to do"}
    assert plan["tasks"][0]["work"] == "cloak 8 photos of 2 protected identities with pgd (surrogates: sface)"
    assert len(uninterrupted["tables"]["cloaks"]) == 2 * 8  # what the run then cloaked: 8 photos per defense
    args = ["run", str(uninterrupted["suite"]), "--out", str(uninterrupted["out"]), "--dry-run", "--json"]
    assert run_cli(args, uninterrupted["cache"], monkeypatch) == EXIT_OK
    assert {t["state"] for t in json.loads(capsys.readouterr().out)["tasks"]} == {"ok"}


def test_parquet_export_keeps_types_and_rows(uninterrupted: dict[str, Any], tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    export_store(uninterrupted["out"], tmp_path, ["parquet"])
    cells = pq.read_table(tmp_path / "cells.parquet")
    assert cells.num_rows == len(uninterrupted["tables"]["cells"])
    assert str(cells.schema.field("oblivious").type) == "bool"
    assert str(cells.schema.field("protection_rate").type) == "double"
    assert str(cells.schema.field("n_queries").type) == "int64"
    queries = pq.read_table(tmp_path / "queries.parquet").to_pylist()
    assert [str(q["rank"]) for q in queries] == [q["rank"] for q in uninterrupted["tables"]["queries"]]
    assert pq.read_table(tmp_path / "attempts.parquet").num_rows >= 1
