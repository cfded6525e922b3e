"""``cloakbench bench``'s peak and FLOP columns: the peak GEMM target, FLOPs per call counted with torch's
FlopCounterMode, GFLOP/s and share of the same run's peak, ``grad:`` targets, and old stores gaining the columns.

Behaviour, never speed thresholds: every count here is checked against an analytic count or an independent
FlopCounterMode count of the same real work (real GEMMs, real SFace on real demo faces).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import cloakbench.bench.timing_suite as ts
from cloakbench.bench.runner import ModelPool
from cloakbench.errors import ConfigError

CPU = torch.device("cpu")
NEW_COLUMNS = ("flops_per_call", "gflops_per_s", "share_of_peak")
SFACE_GFLOP_PER_FACE = 1.148  # FlopCounterMode on sface.embed, measured on 8 demo faces: 1.14827776 GFLOP each


def test_flop_count_of_a_gemm_and_a_linear_layer_is_the_analytic_count() -> None:
    a, b = torch.randn(96, 64), torch.randn(64, 40)
    assert ts.count_flops(lambda: a @ b) == 2 * 96 * 64 * 40
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(16, 64, requires_grad=True)
    assert ts.count_flops(lambda: layer(x)) == 2 * 16 * 64 * 32
    # forward + backward: the input's gradient and the weight's gradient are one GEMM each, as large as the forward
    assert ts.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * 16 * 64 * 32


def test_gflops_and_share_of_peak_are_plain_ratios() -> None:
    assert ts.gflops_per_s(3_000_000_000, 0.5) == pytest.approx(6.0)
    assert ts.share_of_peak(6.0, 24.0) == pytest.approx(0.25)
    assert ts.gflops_per_s(None, 0.5) is None and ts.gflops_per_s(10, None) is None
    assert ts.share_of_peak(None, 24.0) is None and ts.share_of_peak(6.0, None) is None


def test_peak_target_counts_two_n_cubed_and_is_its_own_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ts.PEAK_GEMM_SIZE, "cpu", 256)
    target = ts._peak_target(CPU)
    assert target.name == "peak:gemm-fp32" and target.kind == "peak"
    row, kernels = ts.time_target(target, run_id="r", warmup=0, repeats=2, quiet=True)
    assert row["status"] == "ok", row["error"]
    assert row["flops_per_call"] == 2 * 256**3
    assert row["gflops_per_s"] == pytest.approx(2 * 256**3 / row["median_s"] / 1e9)
    assert row["share_of_peak"] == pytest.approx(1.0)
    assert row["images_per_s_median"] is None and row["images_per_s_iqr"] is None  # a GEMM has no images
    params = json.loads(row["params_json"])
    assert params["n"] == 256 and params["dtype"] == "float32" and params["torch_threads"] == torch.get_num_threads()
    assert kernels and any("mm" in k["name"] for k in kernels)


def test_quick_targets_start_with_the_peak_and_time_gradients_of_white_boxes() -> None:
    faces = torch.rand(ts.FACES, 3, 112, 112)
    targets, _ = ts.build_targets(faces, ModelPool(CPU), quick=True)
    assert [t.name for t in targets] == [
        "peak:gemm-fp32", "embed:sface", "embed:facenet-casia", "grad:sface", "grad:facenet-casia", "cloak:pgd",
        "jpeg:q75",
    ]  # fmt: skip
    assert {t.batch for t in targets if t.kind == "gradient"} == {ts.GRAD_BATCH["cpu"]}
    full, _ = ts.build_targets(faces, ModelPool(CPU), quick=False)
    embedded = {t.name.split(":", 1)[1] for t in full if t.kind == "embedding"}
    graded = {t.name.split(":", 1)[1] for t in full if t.kind == "gradient"}
    assert graded <= embedded and "sface" in graded
    assert not graded & {"sface-onnx", "dlib-resnet", "sface-insightface"}  # black boxes give no gradients


def test_share_of_peak_divides_by_the_same_runs_peak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole run (peak first, a second real GEMM, the JPEG transform): every share is that row's GFLOP/s over
    the peak row's, in the returned rows, the store and bench.md; the JPEG row has no FLOPs and says why."""
    monkeypatch.setitem(ts.PEAK_GEMM_SIZE, "cpu", 256)
    a, b = torch.randn(128, 512), torch.randn(512, 64)

    def small_gemm(batch: int) -> ts.Prepared:
        return ts.Prepared(lambda: a @ b, CPU)

    def targets(faces: torch.Tensor, models: ModelPool, *, quick: bool) -> Any:
        return [ts._peak_target(models.device), ts.Target("gemm:small", "transform", 1, {}, small_gemm),
                ts._jpeg_target(faces)], {}  # fmt: skip

    monkeypatch.setattr(ts, "build_targets", targets)
    out = tmp_path / "bench"
    result = ts.run_timing_suite(out, device="cpu", repeats=2, warmup=0, quick=True, quiet=True)
    rows = {r["target"]: r for r in result["timings"]}
    assert result["failed"] == 0
    peak = rows["peak:gemm-fp32"]["gflops_per_s"]
    small = rows["gemm:small"]
    assert small["flops_per_call"] == 2 * 128 * 512 * 64
    assert small["share_of_peak"] == pytest.approx(small["gflops_per_s"] / peak, rel=1e-12)
    assert rows["peak:gemm-fp32"]["share_of_peak"] == pytest.approx(1.0)
    jpeg = rows["jpeg:q75"]
    assert jpeg["flops_per_call"] is None and jpeg["gflops_per_s"] is None and jpeg["share_of_peak"] is None
    assert "libjpeg" in json.loads(jpeg["params_json"])["flops_note"]

    db = sqlite3.connect(out / ts.STORE_FILE)
    try:
        stored = {
            t: (f, g, s) for t, f, g, s in db.execute(f"SELECT target, {', '.join(NEW_COLUMNS)} FROM bench_timings")
        }
    finally:
        db.close()
    assert stored["gemm:small"] == (small["flops_per_call"], small["gflops_per_s"], small["share_of_peak"])
    md = (out / "bench.md").read_text()
    assert "| GFLOP/s | % of peak |" in md
    assert f"| {small['gflops_per_s']:.3g} | {small['share_of_peak'] * 100:.0f}% |" in md
    assert "| peak:gemm-fp32 |" in md and "no FLOP count: Pillow's libjpeg" in md


def _old_schema_store(path: Path) -> None:
    """A bench_timings table as cloakbench wrote it before the FLOP columns, with one row."""
    old = {k: v for k, v in ts.TIMING_COLUMNS.items() if k not in NEW_COLUMNS}
    db = sqlite3.connect(path)
    try:
        cols = ", ".join(f"{k} {v}" for k, v in old.items())
        db.execute(f"CREATE TABLE bench_timings ({cols}, PRIMARY KEY (run_id, target))")
        row = {k: ("x" if "TEXT" in v else 0) if "NOT NULL" in v else None for k, v in old.items()}
        row.update(run_id="old", target="embed:sface")
        db.execute(
            f"INSERT INTO bench_timings ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", list(row.values())
        )
        db.commit()
    finally:
        db.close()


def test_an_old_bench_timings_table_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / ts.STORE_FILE
    _old_schema_store(path)
    with ts.BenchStore(path) as store:
        new_row: dict[str, Any] = dict.fromkeys(ts.TIMING_COLUMNS)
        new_row.update(run_id="new", target="peak:gemm-fp32", kind="peak", status="ok", device="cpu", batch=1,
                       warmup=0, repeats=1, oom_halvings=0, params_json="{}", samples_json="[]", created_utc="t",
                       flops_per_call=2 * 256**3, gflops_per_s=300.0, share_of_peak=1.0)  # fmt: skip
        store.write_target(new_row, [])
    db = sqlite3.connect(path)
    try:
        columns = [r[1] for r in db.execute("PRAGMA table_info(bench_timings)")]
        rows = dict((r[0], r[1:]) for r in db.execute(f"SELECT run_id, {', '.join(NEW_COLUMNS)} FROM bench_timings"))
    finally:
        db.close()
    assert set(NEW_COLUMNS) <= set(columns)
    assert rows == {"old": (None, None, None), "new": (2 * 256**3, 300.0, 1.0)}
    with ts.BenchStore(path):  # a second open finds nothing to add
        pass


def test_a_table_missing_a_required_column_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / ts.STORE_FILE
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE bench_timings (run_id TEXT NOT NULL, target TEXT NOT NULL)")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=r"bench_timings lacks the required column 'kind'"):
        ts.BenchStore(path)


def test_real_sface_rows_count_the_flops_flop_counter_mode_gives() -> None:
    """embed:sface and grad:sface on 2 real demo faces (warm-up 0, 1 timed call) store the FLOPs that an
    independent FlopCounterMode count of the same work gives: 1.148 GFLOP per face forward, twice that for
    forward + backward (frozen weights: only the input's gradient). A black box (sface-onnx) stores none."""
    faces = ts.load_faces()
    models = ModelPool(CPU)
    embed = dataclasses.replace(ts._embed_target("sface", faces, models), batch=2)
    row, _ = ts.time_target(embed, run_id="r", warmup=0, repeats=1, quiet=True)
    assert row["status"] == "ok", row["error"]
    with FlopCounterMode(display=False) as counter:
        models.get("sface").embed(faces[:2])
    forward = counter.get_total_flops()
    assert row["flops_per_call"] == forward
    assert forward / 2 / 1e9 == pytest.approx(SFACE_GFLOP_PER_FACE, rel=1e-3)
    assert row["gflops_per_s"] == pytest.approx(forward / row["median_s"] / 1e9)
    assert row["share_of_peak"] is None  # no peak given to this lone row

    grad, _ = ts.time_target(ts._grad_target("sface", faces, models, 2), run_id="r", warmup=0, repeats=1, quiet=True)
    assert grad["status"] == "ok", grad["error"]
    assert grad["flops_per_call"] == 2 * forward
    assert grad["images_per_s_median"] == pytest.approx(2 / grad["median_s"])

    onnx = dataclasses.replace(ts._embed_target("sface-onnx", faces, models), batch=2)
    black, _ = ts.time_target(onnx, run_id="r", warmup=0, repeats=1, quiet=True)
    assert black["status"] == "ok", black["error"]
    assert black["flops_per_call"] is None and black["gflops_per_s"] is None
    assert "black box" in json.loads(black["params_json"])["flops_note"]
