"""The timing pipeline (cloakbench.bench.timing) and ``cloakbench bench``: behaviour, never speed thresholds.

The only stand-in is the OOM test's function, which raises ``torch.cuda.OutOfMemoryError`` on purpose (no
CPU can run out of CUDA memory); everything else times real work: real matmuls, real models, real faces.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from cloakbench.bench.timing import (
    OomRecord,
    PeakMemory,
    StageTimer,
    measure,
    per_item,
    run_with_oom_retry,
    summarize,
    top_kernels,
)
from cloakbench.cli import EXIT_OK, main

CPU = torch.device("cpu")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_summarize_known_samples() -> None:
    odd = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (odd.median, odd.q1, odd.q3, odd.iqr, odd.mean, odd.n) == (3.0, 2.0, 4.0, 2.0, 3.0, 5)
    assert odd.samples == (5.0, 1.0, 3.0, 2.0, 4.0)  # in call order, as measured
    even = summarize([4.0, 1.0, 3.0, 2.0])  # linear interpolation between order statistics
    assert even.median == pytest.approx(2.5)
    assert even.q1 == pytest.approx(1.75)
    assert even.q3 == pytest.approx(3.25)
    assert even.iqr == pytest.approx(1.5)
    one = summarize([0.25])
    assert (one.median, one.q1, one.q3, one.iqr) == (0.25, 0.25, 0.25, 0.0)


@pytest.mark.parametrize(("samples", "message"), [([], "no samples"), ([1.0, -0.5], "-0.5"), ([float("nan")], "nan")])
def test_summarize_rejects_bad_samples(samples: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        summarize(samples)


def test_per_item_rates_each_sample() -> None:
    rate = per_item(summarize([1.0, 2.0, 4.0]), 8)  # 8, 4 and 2 items/s
    assert rate.samples == (8.0, 4.0, 2.0)
    assert (rate.median, rate.q1, rate.q3, rate.iqr, rate.items) == (4.0, 3.0, 6.0, 3.0, 8)
    with pytest.raises(ValueError, match="items must be >= 1, got 0"):
        per_item(summarize([1.0]), 0)


def test_measure_calls_warmup_plus_repeats_and_keeps_repeats_samples() -> None:
    a = torch.randn(64, 64)
    calls: list[int] = []

    def fn() -> torch.Tensor:
        calls.append(1)
        return a @ a

    stats = measure(fn, device=CPU, warmup=3, repeats=5)
    assert len(calls) == 8
    assert stats.n == 5 and len(stats.samples) == 5
    assert all(s > 0 for s in stats.samples)
    assert stats.q1 <= stats.median <= stats.q3
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 0"):
        measure(fn, device=CPU, warmup=0, repeats=0)
    with pytest.raises(ValueError, match="warmup must be an integer >= 0, got -1"):
        measure(fn, device=CPU, warmup=-1, repeats=1)


def test_oom_retry_halves_until_it_fits() -> None:
    tried: list[int] = []

    def fn(batch: int) -> str:
        tried.append(batch)
        if batch > 8:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} GiB")
        return f"ran at {batch}"

    result, record = run_with_oom_retry(fn, 64)
    assert result == "ran at 8"
    assert tried == [64, 32, 16, 8]
    assert record == OomRecord(tried=(64, 32, 16, 8), halvings=3)
    assert record.final_batch == 8

    # a plain RuntimeError saying "out of memory" (older torch, cuDNN) is an OOM too
    def old_style(batch: int) -> int:
        if batch > 8:
            raise RuntimeError("CUDA error: out of memory")
        return batch

    assert run_with_oom_retry(old_style, 20)[1].tried == (20, 10, 5)
    _, untouched = run_with_oom_retry(old_style, 4)
    assert untouched == OomRecord(tried=(4,), halvings=0)


def test_oom_retry_reraises_at_min_batch() -> None:
    tried: list[int] = []

    def fn(batch: int) -> None:
        tried.append(batch)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError, match="CUDA out of memory"):
        run_with_oom_retry(fn, 64, min_batch=16)
    assert tried == [64, 32, 16]


def test_oom_retry_passes_other_errors_through_untouched() -> None:
    for error in (ValueError("bad input"), RuntimeError("shape mismatch")):
        calls: list[int] = []

        def fn(batch: int, error: Exception = error, calls: list[int] = calls) -> None:
            calls.append(batch)
            raise error

        with pytest.raises(type(error)) as info:
            run_with_oom_retry(fn, 32)
        assert info.value is error
        assert calls == [32]
    with pytest.raises(ValueError, match=r"min_batch must be an integer in 1\.\.4, got 8"):
        run_with_oom_retry(lambda b: b, 4, min_batch=8)


def test_top_kernels_on_cpu_are_sorted_by_self_time() -> None:
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    rows = top_kernels(lambda: torch.relu(a @ b + 1.0), device=CPU, n=3)
    assert 1 <= len(rows) <= 3
    assert set(rows[0]) == {"name", "calls", "self_ms", "total_ms", "share", "clock"}
    assert all(r["clock"] == "cpu" for r in rows)
    selfs = [r["self_ms"] for r in rows]
    assert selfs == sorted(selfs, reverse=True)
    assert all(0 < r["share"] <= 1 and r["total_ms"] >= r["self_ms"] > 0 and r["calls"] >= 1 for r in rows)
    assert any(r["name"] in ("aten::mm", "aten::addmm", "aten::matmul") for r in rows)


def test_stage_timer_accumulates_per_stage() -> None:
    timer = StageTimer("cpu")
    with timer.stage("load"):
        time.sleep(0.01)
    with timer.stage("embed"):
        pass
    with timer.stage("load"):
        time.sleep(0.01)
    seconds = timer.as_dict()
    assert list(seconds) == ["load", "embed"]
    assert seconds["load"] >= 0.02 and seconds["embed"] >= 0
    with pytest.raises(RuntimeError, match="boom"), timer.stage("fails"):
        raise RuntimeError("boom")
    assert "fails" in timer.as_dict()  # the time up to the error still counts


def test_peak_memory_on_cpu_is_labelled_process_rss() -> None:
    with PeakMemory(CPU) as mem:
        torch.ones(1024, 1024)
    assert mem.peak is not None
    assert mem.peak.kind == "process_max_rss" and mem.peak.bytes > 4 * 2**20


def test_bench_quick_cli_stores_every_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--repeats", "2", "--warmup", "1", "--out", str(out), "--json"])
    assert code == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    expected = {
        "peak:gemm-fp32", "embed:sface", "embed:facenet-casia", "grad:sface", "grad:facenet-casia", "cloak:pgd",
        "jpeg:q75",
    }  # fmt: skip
    assert {r["target"] for r in printed["timings"]} == expected
    assert printed["failed"] == 0

    db = sqlite3.connect(out / "results.sqlite")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.row_factory = sqlite3.Row
        rows = {r["target"]: dict(r) for r in db.execute("SELECT * FROM bench_timings")}
        kernels = db.execute("SELECT target, rank, self_ms FROM bench_kernels ORDER BY target, rank").fetchall()
        meta = {r["key"]: json.loads(r["value"]) for r in db.execute("SELECT key, value FROM bench_metadata")}
    finally:
        db.close()
    assert set(rows) == expected
    for target, row in rows.items():
        assert row["status"] == "ok", (target, row["error"])
        assert row["kind"] == "peak" or row["images_per_s_median"] > 0, target
        assert row["kind"] == "transform" or row["gflops_per_s"] > 0, target
        assert row["q1_s"] <= row["median_s"] <= row["q3_s"], target
        assert (row["warmup"], row["repeats"], row["device"]) == (1, 2, "cpu")
        assert len(json.loads(row["samples_json"])) == 2
        assert row["loadavg_start"] is not None and row["loadavg_end"] is not None  # Linux has a load average
    assert rows["cloak:pgd"]["batch"] == 8 and json.loads(rows["cloak:pgd"]["params_json"])["steps"] == 2
    assert rows["embed:sface"]["batch"] == 32
    assert {k["target"] for k in kernels} >= {"embed:sface", "cloak:pgd"}
    by_target: dict[str, list[float]] = {}
    for k in kernels:
        by_target.setdefault(k["target"], []).append(k["self_ms"])
    assert all(v == sorted(v, reverse=True) for v in by_target.values())
    assert meta["device"] == "cpu" and meta["torch_threads"] >= 1 and "git" in meta
    assert (out / "bench.md").read_text().count("| cloak:pgd |") == 1
    assert json.loads((out / "bench.json").read_text())["run_id"] == printed["run_id"]


@pytest.mark.gpu
@CUDA
def test_cuda_event_timing_and_kernel_summary() -> None:
    cuda = torch.device("cuda")
    a = torch.randn(2048, 2048, device=cuda)
    calls: list[int] = []

    def fn() -> torch.Tensor:
        calls.append(1)
        return a @ a

    with PeakMemory(cuda) as mem:
        stats = measure(fn, device=cuda, warmup=2, repeats=5)
    assert len(calls) == 7 and stats.n == 5
    assert all(s > 0 for s in stats.samples)
    assert mem.peak is not None and mem.peak.kind == "cuda_max_allocated"
    assert mem.peak.bytes >= 2 * a.numel() * a.element_size()  # a and one product at least
    rows = top_kernels(fn, device=cuda, n=5)
    assert rows and all(r["clock"] == "cuda" for r in rows)
    selfs = [r["self_ms"] for r in rows]
    assert selfs == sorted(selfs, reverse=True)
    assert rows[0]["share"] > 0.5  # the GEMM kernel dominates a lone matmul's GPU time
    timer = StageTimer(cuda)
    with timer.stage("gemm"):
        fn()
    assert timer.as_dict()["gemm"] > 0
