"""The results store on its own: atomic task commits (SIGKILL inside a transaction), concurrent writers,
no duplicate rows, a folder bound to one suite, failed tasks replaced when they are retried."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloakbench.bench.plan import Task, TaskKind
from cloakbench.bench.runner import TaskResult
from cloakbench.bench.store import ResultsStore
from cloakbench.errors import ConfigError

CTX = mp.get_context("spawn")  # a clean interpreter per writer, as separate runs would be


def _result(i: int, *, status: str = "ok", rate: float = 0.5) -> TaskResult:
    task = Task(TaskKind.EVALUATE, 0, f"rec{i}", "none")
    cell = {"seed": 0, "protocol": "poisoning", "defense": "pgd", "recognizer": f"rec{i}", "countermeasure": "none",
            "classifier": "nearest-neighbour", "oblivious": bool(i % 2)}  # fmt: skip
    summary = [{**cell, "status": status, "note": "", "n_queries": 3, "protection_rate": rate, "ci_low": math.nan}]
    queries = [{**cell, "protected_identity": "A", "image_id": f"A/{j}.png", "rank": j + 1, "correct": j == 0,
                "true_similarity": 0.1 * j} for j in range(3)]  # fmt: skip
    return TaskResult(task=task, status=status, summary=summary, queries=queries, stages={"embedding": 0.25},
                      grids={f"d{i}": np.full((4, 4, 3), i, dtype=np.uint8)}, service_usage={"search": i})  # fmt: skip


def _count(path: Path, sql: str) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute(sql).fetchone()[0])


def test_rows_round_trip_with_types(tmp_path: Path) -> None:
    with ResultsStore.in_folder(tmp_path) as store:
        assert store.commit(_result(1), attempt=1)
        cells = store.rows("cells")
        queries = store.rows("queries")
        assert store.grids()["d1"].tolist() == np.full((4, 4, 3), 1, dtype=np.uint8).tolist()
        assert store.service_usage() == {"evaluate/0/rec1/none": {"search": 1}}
    assert cells[0]["oblivious"] is True and cells[0]["protection_rate"] == 0.5
    assert math.isnan(cells[0]["ci_low"]) and math.isnan(cells[0]["top5_accuracy"])  # no number: NaN
    assert cells[0]["cloak_s_per_image"] is None
    assert [q["correct"] for q in queries] == [True, False, False] and queries[2]["rank"] == 3


def test_an_ok_task_is_never_written_twice_and_a_failed_one_is_replaced(tmp_path: Path) -> None:
    with ResultsStore.in_folder(tmp_path) as store:
        assert store.commit(_result(1, status="failed", rate=0.1), attempt=1)
        assert store.task_states() == {"evaluate/0/rec1/none": "failed"}
        assert store.commit(_result(1, rate=0.9), attempt=2)  # the retry replaces the failed rows
        assert not store.commit(_result(1, rate=0.2), attempt=3)  # already ok: nothing written
        assert [r["protection_rate"] for r in store.rows("cells")] == [0.9]
        assert len(store.rows("queries")) == 3
        assert store.task_states() == {"evaluate/0/rec1/none": "ok"}


def test_a_folder_holds_one_suite(tmp_path: Path) -> None:
    with ResultsStore.in_folder(tmp_path) as store:
        assert store.bind_suite({"name": "s", "seeds": [0]}, "aaa") is True
        assert store.bind_suite({"name": "s", "seeds": [0]}, "aaa") is False  # the same suite: a resume
        with pytest.raises(ConfigError, match=r"another version of suite 's' \(differs in: seeds\)"):
            store.bind_suite({"name": "s", "seeds": [0, 1]}, "bbb")


def _die_inside_a_transaction(path: str, ready: Any) -> None:
    store = ResultsStore(Path(path))
    db = store._db
    db.execute("BEGIN IMMEDIATE")
    ResultsStore._insert(db, "cells", "evaluate/0/rec7/none", _result(7).summary)
    ResultsStore._insert(db, "queries", "evaluate/0/rec7/none", _result(7).queries)
    ready.set()
    signal.pause()  # killed here, with the rows written but not committed


def test_sigkill_inside_a_commit_leaves_no_partial_task(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    with ResultsStore(path) as store:
        store.commit(_result(1), attempt=1)
    ready = CTX.Event()
    child = CTX.Process(target=_die_inside_a_transaction, args=(str(path), ready))
    child.start()
    assert ready.wait(60), "the writer never reached its transaction"
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    with ResultsStore(path) as store:  # opens (recovers the WAL) and takes the write lock the dead writer held
        assert set(store.task_states()) == {"evaluate/0/rec1/none"}
        assert store.commit(_result(7), attempt=2)
    assert _count(path, "SELECT COUNT(*) FROM queries WHERE task_key = 'evaluate/0/rec7/none'") == 3
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _writer(path: str, order: list[int], start: Any) -> None:
    start.wait()
    with ResultsStore(Path(path)) as store:
        for i in order:
            store.commit(_result(i), attempt=os.getpid())


def test_concurrent_writers_neither_corrupt_nor_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    ResultsStore(path).close()
    start = CTX.Event()
    rng = np.random.default_rng(0)
    procs = [CTX.Process(target=_writer, args=(str(path), rng.permutation(12).tolist(), start)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert _count(path, "SELECT COUNT(*) FROM tasks") == 12
    assert _count(path, "SELECT COUNT(*) FROM cells") == 12
    assert _count(path, "SELECT COUNT(*) FROM queries") == 36
    assert _count(path, "SELECT COUNT(*) FROM grids") == 12
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_embedding_halves_its_batch_on_cuda_out_of_memory(
    celeb24_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from cloakbench.attacks.recognizers import RECOGNIZERS
    from cloakbench.bench.runner import StageClock, _embed
    from cloakbench.images import load_image, stack_images

    rec = RECOGNIZERS.create("sface")
    images = stack_images([load_image(p) for p in sorted(celeb24_root.glob("*/*.png"))[::97][:12]])
    expected = rec.embed_batched(images, batch_size=3).numpy()
    real_embed = rec.embed

    def embed(x: torch.Tensor) -> torch.Tensor:  # a device that holds 3 faces at a time
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_embed(x)

    monkeypatch.setattr(rec, "embed", embed)
    clock = StageClock(torch.device("cpu"))
    got = _embed(rec, images, None, 0, clock)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    tried, batch = [], rec.preferred_batch_size
    while batch > 3:
        tried.append(batch)
        batch //= 2
    tried.append(max(batch, 1))
    assert clock.events == [
        {"kind": "oom-retry", "detail": f"embedding with sface: batch {' -> '.join(map(str, tried))}"}
    ]
    with ResultsStore.in_folder(tmp_path) as store:  # the event is kept with its task
        store.commit(TaskResult(task=Task(TaskKind.EVALUATE, 0, "sface", "none"), events=clock.events), attempt=1)
        assert store.rows("events") == [{"task_key": "evaluate/0/sface/none", **clock.events[0]}]
