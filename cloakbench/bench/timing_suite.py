"""``cloakbench bench``: throughput of the expensive steps on real models and real faces.

Targets (each timed with :func:`cloakbench.bench.timing.measure`: warm-up calls, then timed repeats, CUDA
synchronised inside the timed region):

- ``peak:gemm-fp32`` — timed first: one fp32 ``torch.mm`` of two square matrices (:data:`PEAK_GEMM_SIZE`:
  2048 on a CPU, 8192 on a GPU) on the bench's device, at the process's torch thread count (TF32 as the
  process has it, recorded in ``allow_tf32``). Its GFLOP/s is the machine's measured peak that every other
  target's ``share_of_peak`` divides by; its ``batch`` is 1 (one product per call) and its images/s are NULL.
- ``embed:<recognizer>`` — ``embed_batched`` of 32 aligned demo faces, for every recognizer whose weights are
  on this machine (``--quick``: sface and facenet-casia). The recognizer splits the 32 into forward passes
  of its preferred batch size (``forward_batch`` in the row's params: 8 on a CPU, where larger batches are
  slower per image, 256 on a GPU); black boxes (ONNX, dlib) run on the CPU whatever the device.
- ``cloak:<defense>`` — ``Defense.protect`` (clean embedding, optimisation, budget, quantisation) of a batch
  of faces with SFace as the surrogate (LowKey: SFace and FaceNet-CASIA): pgd with 10 steps, fawkes-low and
  lowkey. A CPU cannot afford the presets' 50 steps x (warm-up + repeats) in a few minutes, so on the CPU
  those two run :data:`CPU_PRESET_STEPS` steps and say so (``steps`` / ``preset_steps`` in the params);
  ``--quick`` times pgd only, with :data:`QUICK_PGD_STEPS` steps.
- ``grad:<recognizer>`` — forward and backward of every white-box recognizer (tagged ``white-box``, whose
  weights are on this machine; ``--quick``: sface and facenet-casia) on :data:`GRAD_BATCH` faces (8 on a CPU,
  32 on a GPU): ``rec.embed(x, grad=True)``, then ``torch.autograd.grad(out.sum(), x)``, one pass of the
  whole batch (what a cloaking step costs per surrogate).
- ``jpeg:q75`` — the ``jpeg`` transform (Pillow's libjpeg encode + decode) of 32 faces, on the CPU.

FLOPs: after timing, one more untimed call of each target runs under ``torch.utils.flop_counter.
FlopCounterMode`` and its total is ``flops_per_call``; ``gflops_per_s`` is that over the median seconds per
call, and ``share_of_peak`` is ``gflops_per_s`` over the same run's ``peak:gemm-fp32`` GFLOP/s (NULL when the
peak target failed). FlopCounterMode counts matrix products and convolutions (forward and backward) only:
elementwise work (activations, batch norm, SSIM's arithmetic outside its convolutions) adds time but no
FLOPs, so the share is of useful GEMM/convolution work. Work outside torch is invisible to it: black-box
recognizers (onnxruntime, dlib, insightface) and the JPEG transform get NULL FLOPs and say why in the row's
``flops_note`` param (and the Markdown notes). Measured on this workplace's 2-core Intel Xeon (AVX-512),
torch 2.13 CPU, 2 threads, medians of 20, 5 and 2 calls of ``torch.mm(a, b, out=c)`` after one warm-up: 336
GFLOP/s at n = 1024, 334 at 2048, 271 (best call 336) at 4096: the plateau is reached by 1024, and 2048
(0.05 s a call) is on it without the 4096 product's 0.5 s calls; FlopCounterMode counts SFace's forward at
1.148 GFLOP per 112x112 face and FaceNet-CASIA's at 2.835 GFLOP per face (160x160), forward+backward to the
input exactly twice that (the weights are frozen: no weight gradients). The peak is measured in the same run
because it moves with the machine's load like every other target: a ``--quick`` run while other work held the
load average at 2-7 on these 2 cores measured 113 GFLOP/s for it.

For every target: seconds per call (median, quartiles, IQR, the samples), images/s per sample (median and IQR),
FLOPs per call, GFLOP/s and share of peak (above), peak memory (on CUDA ``max_memory_allocated`` reset before
the target; on the CPU the process's lifetime max RSS, labelled as such), the profiler's top ops of one more
call (self CUDA time on GPU, self CPU time on CPU) and the system's 1-minute load average when the target's
calls started and ended (a number taken while other work competed for the cores is slower than the machine's;
the load says so). On a CUDA out-of-memory error the target's batch is halved and retried (recorded in
``oom_halvings``). A target that fails is a row with ``status = failed`` and its error, not a crashed bench.

Everything lands in ``<out>/results.sqlite`` (WAL; tables ``bench_timings``, ``bench_kernels`` and
``bench_metadata``, keyed by a ``run_id`` so a reused folder keeps earlier runs apart; one transaction per
finished target), ``<out>/bench.json`` and ``<out>/bench.md``. A ``bench_timings`` table written by an older
cloakbench (without ``flops_per_call``, ``gflops_per_s``, ``share_of_peak``) gains those columns (``ALTER
TABLE ... ADD COLUMN``, NULL in its old rows) when the store is opened for writing.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.recognizers.base import Precision
from cloakbench.bench import metadata
from cloakbench.bench.runner import ModelPool, resolve_device
from cloakbench.bench.store import SqliteFile
from cloakbench.bench.timing import PeakMemory, measure, per_item, run_with_oom_retry, top_kernels
from cloakbench.cache import atomic_write_text
from cloakbench.devices import matmul_settings
from cloakbench.errors import ConfigError

log = logging.getLogger(__name__)

STORE_FILE = "results.sqlite"
FACES = 32
EMBED_BATCH = 32
JPEG_QUALITY = 75
QUICK_RECOGNIZERS = ("sface", "facenet-casia")
QUICK_PGD_STEPS = 2
PGD_STEPS = 10
CPU_PRESET_STEPS = 5
"""Steps of fawkes-low and lowkey on a CPU (their presets take 50): enough to time a step, cheap enough to
repeat. Their images/s are then those of this shorter run, not of the preset."""
TOP_KERNELS = 10
PEAK_GEMM_SIZE: dict[str, int] = {"cpu": 2048, "cuda": 8192}
"""Side of the square fp32 matrices of ``peak:gemm-fp32`` per device type (measurements: module docstring)."""
GRAD_BATCH: dict[str, int] = {"cpu": 8, "cuda": 32}
"""Faces per ``grad:<recognizer>`` call per device type."""
QUICK_GRAD_RECOGNIZERS = ("sface", "facenet-casia")
USER = "bench-user"  # one identity label for the whole batch (Fawkes picks one target for it)

TIMING_COLUMNS: dict[str, str] = {
    "run_id": "TEXT NOT NULL",
    "target": "TEXT NOT NULL",
    "kind": "TEXT NOT NULL",
    "status": "TEXT NOT NULL",
    "error": "TEXT",
    "device": "TEXT NOT NULL",
    "batch": "INTEGER NOT NULL",
    "warmup": "INTEGER NOT NULL",
    "repeats": "INTEGER NOT NULL",
    "median_s": "REAL",
    "q1_s": "REAL",
    "q3_s": "REAL",
    "iqr_s": "REAL",
    "mean_s": "REAL",
    "images_per_s_median": "REAL",
    "images_per_s_iqr": "REAL",
    "peak_memory_bytes": "INTEGER",
    "peak_memory_kind": "TEXT",
    "oom_halvings": "INTEGER NOT NULL",
    "loadavg_start": "REAL",
    "loadavg_end": "REAL",
    "flops_per_call": "INTEGER",
    "gflops_per_s": "REAL",
    "share_of_peak": "REAL",
    "params_json": "TEXT NOT NULL",
    "samples_json": "TEXT NOT NULL",
    "created_utc": "TEXT NOT NULL",
}
KERNEL_COLUMNS: dict[str, str] = {
    "run_id": "TEXT NOT NULL",
    "target": "TEXT NOT NULL",
    "rank": "INTEGER NOT NULL",
    "name": "TEXT NOT NULL",
    "calls": "INTEGER NOT NULL",
    "self_ms": "REAL NOT NULL",
    "total_ms": "REAL NOT NULL",
    "share": "REAL NOT NULL",
    "clock": "TEXT NOT NULL",
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Prepared:
    """A target ready to time: the call, the device its work runs on, and params learned while loading."""

    call: Callable[[], object]
    device: torch.device
    params: Mapping[str, Any] = field(default_factory=dict)
    flops_unavailable: str = ""
    """Why FlopCounterMode cannot count this call's work (black boxes, work outside torch); empty: count it."""


@dataclass(frozen=True)
class Target:
    """One thing to time; ``prepare(batch)`` loads what it needs, untimed."""

    name: str
    kind: str  # "peak", "embedding", "gradient", "cloaking" or "transform"
    batch: int
    params: Mapping[str, Any]
    prepare: Callable[[int], Prepared] = field(repr=False, compare=False)


def load_faces(n: int = FACES) -> torch.Tensor:
    """``n`` aligned demo faces spread over the demo identities (every third photo in path order)."""
    from cloakbench.datasets import demo_dataset
    from cloakbench.images import load_image, stack_images

    root, _ = demo_dataset()
    paths = sorted(root.glob("*/*.png"))
    chosen = paths[::3][:n] if len(paths[::3]) >= n else paths[:n]
    if len(chosen) < n:
        raise ConfigError(f"bench: the demo dataset at {root} has {len(paths)} faces; {n} are needed")
    return stack_images([load_image(p) for p in chosen])


def available_recognizers() -> tuple[list[str], dict[str, str]]:
    """Recognizers whose weights this machine has, and the others with the reason they are left out."""
    names: list[str] = []
    skipped: dict[str, str] = {}
    for entry in RECOGNIZERS:
        cached = entry.meta.is_cached
        if cached is not None and not cached():
            skipped[entry.name] = "weights not on this machine (fetched on first use)"
        else:
            names.append(entry.name)
    return names, skipped


def preset_steps(defense: str) -> int:
    """The number of steps a defense preset runs (its registered default, else its config's default)."""
    from cloakbench.defenses import DEFENSES

    entry = DEFENSES.get(defense)
    if "steps" in entry.defaults:
        return int(entry.defaults["steps"])
    if entry.config is not None:
        for f in dataclasses.fields(entry.config):
            if f.name == "steps" and isinstance(f.default, int):
                return f.default
    raise ConfigError(f"bench: defense {defense!r} has no 'steps' parameter to report")


def white_box_recognizers(names: Sequence[str]) -> list[str]:
    """Those of ``names`` registered as white boxes (tag ``white-box``): the ones a ``grad:`` target can time."""
    return [n for n in names if "white-box" in RECOGNIZERS.get(n).meta.tags]


def _black_box_note(rec: Recognizer) -> str:
    """Why a recognizer's FLOPs cannot be counted (empty for a torch module, whose work FlopCounterMode sees)."""
    if rec.capabilities.differentiable:
        return ""
    return f"{rec.name} is a black box running outside torch (onnxruntime/dlib): FlopCounterMode cannot see its work"


def _peak_target(device: torch.device, dtype: torch.dtype = torch.float32) -> Target:
    """``peak:gemm-<dtype>``: one square matrix product at :data:`PEAK_GEMM_SIZE`, the run's measured peak."""
    n = PEAK_GEMM_SIZE["cuda" if device.type == "cuda" else "cpu"]
    label = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))

    def prepare(batch: int) -> Prepared:
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        params: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
        if device.type == "cuda":
            params["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        return Prepared(lambda: torch.mm(a, b, out=out), device, params)

    return Target(f"peak:gemm-{label}", "peak", 1, {"n": n, "dtype": str(dtype).removeprefix("torch.")}, prepare)


def _grad_target(name: str, faces: torch.Tensor, models: ModelPool, batch: int) -> Target:
    """``grad:<recognizer>``: embedding with gradients of ``batch`` faces, then the gradient w.r.t. the input."""

    def prepare(batch: int) -> Prepared:
        rec = models.get(name)
        if not rec.capabilities.differentiable:
            raise ConfigError(f"bench: recognizer {name!r} is a black box; grad:{name} needs a white box")
        x = faces[:batch].to(rec.device).clone().requires_grad_(True)

        def call() -> torch.Tensor:
            out = rec.embed(x, grad=True)
            (g,) = torch.autograd.grad(out.sum(), x)
            return g

        return Prepared(call, rec.device)

    return Target(f"grad:{name}", "gradient", batch, {"recognizer": name}, prepare)


def _embed_target(name: str, faces: torch.Tensor, models: ModelPool) -> Target:
    def prepare(batch: int) -> Prepared:
        rec = models.get(name)
        images = faces[:batch]
        return Prepared(
            lambda: rec.embed_batched(images),
            rec.device,
            {"forward_batch": min(batch, rec.embed_batch_size)},
            flops_unavailable=_black_box_note(rec),
        )

    return Target(f"embed:{name}", "embedding", EMBED_BATCH, {"recognizer": name}, prepare)


def _cloak_target(
    defense: str, surrogates: Sequence[str], steps: int, batch: int, faces: torch.Tensor, models: ModelPool
) -> Target:
    from cloakbench.defenses import DEFENSES

    def prepare(batch: int) -> Prepared:
        recs = [models.get(s) for s in surrogates]
        cloak = DEFENSES.create(defense, surrogates=recs, name=defense, steps=steps)
        images = faces[:batch]
        users = [USER] * batch
        return Prepared(
            lambda: cloak.protect(images, users, generator=torch.Generator().manual_seed(0)), recs[0].device
        )

    params = {"defense": defense, "surrogates": list(surrogates), "steps": steps, "preset_steps": preset_steps(defense)}
    return Target(f"cloak:{defense}", "cloaking", batch, params, prepare)


def _jpeg_target(faces: torch.Tensor) -> Target:
    from cloakbench.attacks.transforms import TRANSFORMS

    def prepare(batch: int) -> Prepared:
        jpeg = TRANSFORMS.create("jpeg", quality=JPEG_QUALITY)
        images = faces[:batch]
        return Prepared(
            lambda: jpeg.apply(images, generator=torch.Generator().manual_seed(0)),
            torch.device("cpu"),
            flops_unavailable="Pillow's libjpeg runs outside torch: FlopCounterMode cannot see its work",
        )

    return Target(f"jpeg:q{JPEG_QUALITY}", "transform", FACES, {"quality": JPEG_QUALITY}, prepare)


def build_targets(faces: torch.Tensor, models: ModelPool, *, quick: bool) -> tuple[list[Target], dict[str, str]]:
    """The targets of a run, and the recognizers left out (name -> reason)."""
    on_cpu = models.device.type == "cpu"
    recognizers, skipped = (list(QUICK_RECOGNIZERS), {}) if quick else available_recognizers()
    targets = [_peak_target(models.device)]  # first: every later row's share_of_peak divides by it
    targets += [_embed_target(name, faces, models) for name in recognizers]
    grad_batch = GRAD_BATCH["cpu" if on_cpu else "cuda"]
    grad_names = list(QUICK_GRAD_RECOGNIZERS) if quick else white_box_recognizers(recognizers)
    targets += [_grad_target(name, faces, models, grad_batch) for name in grad_names]
    cloak_batch = 8 if on_cpu else 32
    if quick:
        targets.append(_cloak_target("pgd", ["sface"], QUICK_PGD_STEPS, cloak_batch, faces, models))
    else:
        targets.append(_cloak_target("pgd", ["sface"], PGD_STEPS, cloak_batch, faces, models))
        for defense, surrogates in (("fawkes-low", ["sface"]), ("lowkey", ["sface", "facenet-casia"])):
            full = preset_steps(defense)
            steps = min(CPU_PRESET_STEPS, full) if on_cpu else full
            targets.append(_cloak_target(defense, surrogates, steps, cloak_batch, faces, models))
    targets.append(_jpeg_target(faces))
    return targets, skipped


def _loadavg() -> float | None:
    """The system's 1-minute load average (None where the OS has none): other work competing for the cores."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs of one call of ``call``, as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matrix
    products and convolutions, forward and backward; nothing outside torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def gflops_per_s(flops: int | None, seconds: float | None) -> float | None:
    """Achieved GFLOP/s: ``flops`` per call over ``seconds`` per call (None when either is unknown)."""
    if flops is None or seconds is None or seconds <= 0:
        return None
    return flops / seconds / 1e9


def share_of_peak(gflops: float | None, peak_gflops: float | None) -> float | None:
    """``gflops`` as a share of the run's measured peak GEMM GFLOP/s (None when either is unknown)."""
    if gflops is None or peak_gflops is None or peak_gflops <= 0:
        return None
    return gflops / peak_gflops


def _flops_of(prepared: Prepared) -> tuple[int | None, str]:
    """One untimed counted call: the FLOPs, or None and why not."""
    if prepared.flops_unavailable:
        return None, prepared.flops_unavailable
    try:
        flops = count_flops(prepared.call)
    except Exception as exc:  # a count that fails leaves the timing standing
        log.warning("bench: FlopCounterMode failed: %s", exc, exc_info=True)
        return None, f"FlopCounterMode failed: {type(exc).__name__}: {exc}"
    if flops <= 0:
        return None, "FlopCounterMode counted no matrix products or convolutions"
    return flops, ""


def time_target(
    target: Target,
    *,
    run_id: str,
    warmup: int,
    repeats: int,
    quiet: bool = False,
    peak_gflops: float | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``bench_timings`` row of one target and its ``bench_kernels`` rows; a target that raises gives a
    ``failed`` row (with its error) and no kernel rows. ``quiet``: no profiler lines on stderr. ``peak_gflops``:
    the run's measured peak, the denominator of ``share_of_peak`` (a ``peak`` target's own row divides by its
    own GFLOP/s when it is not given)."""

    def attempt(batch: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        prepared = target.prepare(batch)
        device = prepared.device
        load_start = _loadavg()
        with PeakMemory(device) as mem:
            stats = measure(prepared.call, device=device, warmup=warmup, repeats=repeats)
        load_end = _loadavg()
        kernels = top_kernels(prepared.call, device=device, n=TOP_KERNELS, quiet=quiet)
        flops, flops_note = _flops_of(prepared)
        rate = None if target.kind == "peak" else per_item(stats, batch)  # a GEMM has no images
        achieved = gflops_per_s(flops, stats.median)
        peak = achieved if target.kind == "peak" and peak_gflops is None else peak_gflops
        params = {**target.params, **prepared.params, **({"flops_note": flops_note} if flops_note else {})}
        measured = {
            "device": str(device),
            "batch": batch,
            "median_s": stats.median,
            "q1_s": stats.q1,
            "q3_s": stats.q3,
            "iqr_s": stats.iqr,
            "mean_s": stats.mean,
            "images_per_s_median": None if rate is None else rate.median,
            "images_per_s_iqr": None if rate is None else rate.iqr,
            "peak_memory_bytes": None if mem.peak is None else mem.peak.bytes,
            "peak_memory_kind": None if mem.peak is None else mem.peak.kind,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "flops_per_call": flops,
            "gflops_per_s": achieved,
            "share_of_peak": share_of_peak(achieved, peak),
            "params_json": json.dumps(params, sort_keys=True),
            "samples_json": json.dumps(list(stats.samples)),
        }
        return measured, kernels

    base: dict[str, Any] = {
        "run_id": run_id, "target": target.name, "kind": target.kind, "warmup": warmup, "repeats": repeats,
    }  # fmt: skip
    try:
        (measured, kernels), record = run_with_oom_retry(attempt, target.batch)
    except Exception as exc:  # one failed target is a failed row, not a crashed bench (DESIGN §8)
        log.warning("bench: target %s failed: %s", target.name, exc, exc_info=True)
        empty = dict.fromkeys(("median_s", "q1_s", "q3_s", "iqr_s", "mean_s", "images_per_s_median",
                               "images_per_s_iqr", "peak_memory_bytes", "peak_memory_kind", "loadavg_start",
                               "loadavg_end", "flops_per_call", "gflops_per_s", "share_of_peak"))  # fmt: skip
        row = {
            **base, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "device": "", "batch": target.batch,
            **empty, "oom_halvings": 0, "params_json": json.dumps(dict(target.params), sort_keys=True),
            "samples_json": "[]", "created_utc": _utc_now(),
        }  # fmt: skip
        return row, []
    row = {
        **base, "status": "ok", "error": None, **measured, "oom_halvings": record.halvings, "created_utc": _utc_now(),
    }  # fmt: skip
    kernel_rows = [{"run_id": run_id, "target": target.name, "rank": i + 1, **k} for i, k in enumerate(kernels)]
    return row, kernel_rows


class BenchStore(SqliteFile):
    """The ``bench_*`` tables of ``<out>/results.sqlite`` (WAL; one transaction per write)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, timeout_s=60.0)
        timing_cols = ", ".join(f"{k} {v}" for k, v in TIMING_COLUMNS.items())
        kernel_cols = ", ".join(f"{k} {v}" for k, v in KERNEL_COLUMNS.items())
        self._db.executescript(
            "BEGIN IMMEDIATE;\n"
            f"CREATE TABLE IF NOT EXISTS bench_timings ({timing_cols}, PRIMARY KEY (run_id, target));\n"
            f"CREATE TABLE IF NOT EXISTS bench_kernels ({kernel_cols}, PRIMARY KEY (run_id, target, rank));\n"
            "CREATE TABLE IF NOT EXISTS bench_metadata (run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, "
            "PRIMARY KEY (run_id, key));\n"
            "COMMIT;"
        )
        try:
            self._add_missing_columns("bench_timings", TIMING_COLUMNS)
        except BaseException:
            self.close()
            raise

    def _add_missing_columns(self, table: str, columns: Mapping[str, str]) -> None:
        """Columns a newer cloakbench added to ``table`` (which an older one created without them), added with
        NULL in the old rows; a missing column that must not be NULL cannot be added and is refused by name."""
        with self._transaction() as db:
            have = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name in have:
                    continue
                if "NOT NULL" in decl.upper():
                    raise ConfigError(
                        f"{self.path}: table {table} lacks the required column {name!r} ({decl}); "
                        "write this bench to a new --out folder"
                    )
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def _insert(self, table: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        marks = ", ".join("?" for _ in columns)
        self._db.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", [[r[c] for c in columns] for r in rows]
        )

    def write_metadata(self, run_id: str, values: Mapping[str, Any]) -> None:
        with self._transaction():
            rows = [{"run_id": run_id, "key": k, "value": json.dumps(v, default=str)} for k, v in values.items()]
            self._insert("bench_metadata", ["run_id", "key", "value"], rows)

    def write_target(self, row: Mapping[str, Any], kernels: Sequence[Mapping[str, Any]]) -> None:
        """A target's row and its kernel rows, in one transaction."""
        with self._transaction():
            self._insert("bench_timings", list(TIMING_COLUMNS), [row])
            self._insert("bench_kernels", list(KERNEL_COLUMNS), kernels)


def _fmt_rate(value: float | None, iqr: float | None) -> tuple[str, str]:
    if value is None or iqr is None:
        return "—", "—"
    return f"{value:.3g}", f"{iqr:.2g}"


def _fmt_bytes(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.0f} MiB"


def markdown(result: Mapping[str, Any], *, kernels_per_target: int = 5) -> str:
    """``bench.md``: the metadata line, the timing table and the top ops per target."""
    meta = result["metadata"]
    bench_meta = meta.get("bench") or {}
    torch_version = (meta.get("packages") or {}).get("torch")
    where = meta.get("gpu_name") or meta.get("cpu")
    lines = [
        f"# cloakbench bench ({result['run_id']})",
        "",
        f"{meta.get('utc_time')}; device {meta.get('device')} ({where}); torch {torch_version}, "
        f"{meta.get('torch_threads')} threads; {result['warmup']} warm-up call(s), {result['repeats']} timed; "
        f"{'quick' if result['quick'] else 'full'} mode; precision {bench_meta.get('precision', 'fp32')}"
        f"{', TF32 allowed' if (bench_meta.get('matmul') or {}).get('tf32_matmul') else ''}.",
        "",
        "| target | device | batch | images/s (median) | images/s IQR | s/call (median) | s/call IQR | GFLOP/s "
        "| % of peak | peak memory | load 1 min | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in result["timings"]:
        rate, rate_iqr = _fmt_rate(row["images_per_s_median"], row["images_per_s_iqr"])
        secs, secs_iqr = _fmt_rate(row["median_s"], row["iqr_s"])
        params = json.loads(row["params_json"])
        notes = []
        if row["status"] != "ok":
            notes.append(f"FAILED: {row['error']}")
        if "steps" in params:
            steps = f"{params['steps']} steps"
            notes.append(
                steps
                if params["steps"] == params.get("preset_steps")
                else f"{steps} (preset: {params['preset_steps']})"
            )
        if "forward_batch" in params:
            notes.append(f"forward batch {params['forward_batch']}")
        if row["kind"] == "peak":
            notes.append(f"{params.get('dtype')} GEMM, n = {params.get('n')}: the run's peak (no images)")
        if row.get("flops_per_call") is not None:
            notes.append(f"{row['flops_per_call'] / 1e9:.3g} GFLOP/call")
        if "flops_note" in params:
            notes.append(f"no FLOP count: {params['flops_note']}")
        if row["oom_halvings"]:
            notes.append(f"batch halved {row['oom_halvings']}x after CUDA OOM")
        memory = _fmt_bytes(row["peak_memory_bytes"])
        if row["peak_memory_kind"] == "process_max_rss":
            memory += " (RSS)"
        load = (
            f"{row['loadavg_start']:.1f} → {row['loadavg_end']:.1f}"
            if row["loadavg_start"] is not None and row["loadavg_end"] is not None
            else "—"
        )
        gflops = row.get("gflops_per_s")
        share = row.get("share_of_peak")
        lines.append(
            f"| {row['target']} | {row['device'] or '—'} | {row['batch']} | {rate} | {rate_iqr} | {secs} | {secs_iqr} "
            f"| {'—' if gflops is None else f'{gflops:.3g}'} | {'—' if share is None else f'{share * 100:.0f}%'} "
            f"| {memory} | {load} | {'; '.join(notes)} |"
        )
    lines += [
        "",
        "images/s: batch / seconds of each timed call, then median and IQR of those. GFLOP/s: the FLOPs of one "
        "more (untimed) call as torch's FlopCounterMode counts them (matrix products and convolutions only; "
        "elementwise work takes time but counts nothing) over the median seconds per call; % of peak: that over "
        "this run's peak:gemm row (the same machine's fp32 matrix product at the same thread count). Peak memory: CUDA "
        "`max_memory_allocated` during the target's calls, or, marked RSS, the process's maximum resident set "
        "size so far (a lifetime high-water mark, not the target's own). The op tables come from one more "
        "call under torch.profiler, which sees torch ops only: work inside Pillow's libjpeg, onnxruntime or dlib "
        "does not appear in them, and `share` is of the profiled self time. Load 1 min: the system's load average "
        "when the target's calls started and ended; above the core count, other work was competing for the CPU "
        "and the numbers are slower than the machine's.",
    ]
    if result.get("skipped"):
        lines += ["", "Left out: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()) + "."]
    for target, rows in result["kernels"].items():
        if not rows:
            continue
        clock = "self CUDA time" if rows[0]["clock"] == "cuda" else "self CPU time (CPU ops, no GPU)"
        lines += [
            "",
            f"## {target}: top ops by {clock}",
            "",
            "| # | op | calls | self ms | total ms | share |",
            "|---:|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {k['rank']} | `{k['name']}` | {k['calls']} | {k['self_ms']:.1f} | {k['total_ms']:.1f} "
            f"| {k['share'] * 100:.1f}% |"
            for k in rows[:kernels_per_target]
        ]
    return "\n".join(lines) + "\n"


def _rates_line(row: Mapping[str, Any]) -> str:
    """A finished row's images/s and GFLOP/s (with its share of peak), as far as it has them."""
    parts = []
    if row["images_per_s_median"] is not None:
        parts.append(f"{row['images_per_s_median']:.3g} images/s (IQR {row['images_per_s_iqr']:.2g})")
    if row["gflops_per_s"] is not None:
        share = row["share_of_peak"]
        parts.append(f"{row['gflops_per_s']:.3g} GFLOP/s" + ("" if share is None else f" ({share * 100:.0f}% of peak)"))
    return ", ".join(parts) or "done"


def run_timing_suite(
    out_dir: Path,
    *,
    device: str = "auto",
    repeats: int,
    warmup: int,
    quick: bool,
    progress: Progress | None = None,
    quiet: bool = False,
    precision: str = "fp32",
    tf32: bool = False,
) -> dict[str, Any]:
    """Time every target into ``out_dir`` (see the module docstring); returns what ``bench.json`` holds:
    ``run_id``, ``out_dir``, ``metadata``, ``timings`` (the stored rows), ``kernels`` (per target), ``skipped``,
    ``failed`` (how many targets failed). ``quiet``: the profiler prints nothing on stderr either. ``precision``:
    the white-box networks' arithmetic (``fp32`` or ``bf16``, :class:`~cloakbench.attacks.recognizers.base.
    Precision`); ``tf32``: TF32 matmuls allowed (:func:`~cloakbench.devices.matmul_settings`, restored after)."""
    if precision not in {p.value for p in Precision}:
        raise ConfigError(f"bench: precision must be one of {', '.join(p.value for p in Precision)}, got {precision!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"bench: repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"bench: warmup must be an integer >= 0, got {warmup!r}")
    out_dir = Path(out_dir).resolve()
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"bench: device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    dev = resolve_device(device)
    say: Progress = progress or (lambda _message: None)
    run_id = f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"

    say(f"loading {FACES} demo faces")
    faces = load_faces()
    models = ModelPool(dev, precision=precision)
    targets, skipped = build_targets(faces, models, quick=quick)
    timings: list[dict[str, Any]] = []
    kernels: dict[str, list[dict[str, Any]]] = {}
    peak_gflops: float | None = None  # from the peak target, timed first (build_targets puts it there)
    with matmul_settings(dev, tf32=tf32) as matmul, BenchStore(out_dir / STORE_FILE) as store:
        for i, target in enumerate(targets, 1):
            say(f"[{i}/{len(targets)}] {target.name}: batch {target.batch}, {warmup} warm-up + {repeats} timed call(s)")
            row, kernel_rows = time_target(
                target, run_id=run_id, warmup=warmup, repeats=repeats, quiet=quiet, peak_gflops=peak_gflops
            )
            if target.kind == "peak" and row["status"] == "ok" and peak_gflops is None:
                peak_gflops = row["gflops_per_s"]
            store.write_target(row, kernel_rows)
            timings.append(row)
            kernels[target.name] = kernel_rows
            if row["status"] == "ok":
                say(f"[{i}/{len(targets)}] {target.name}: {_rates_line(row)} on {row['device']}")
            else:
                say(f"[{i}/{len(targets)}] {target.name}: FAILED ({row['error']})")
        meta = metadata.collect(dev, onnx_providers=models.onnx_providers())
        meta["bench"] = {
            "device_requested": device, "repeats": repeats, "warmup": warmup, "quick": quick,
            "timing": "CUDA events with synchronize inside the timed region" if dev.type == "cuda"
            else "time.perf_counter around each call",
            "skipped": skipped, "precision": precision, "matmul": matmul,
        }  # fmt: skip
        store.write_metadata(run_id, meta)
    failed = sum(1 for r in timings if r["status"] != "ok")
    result: dict[str, Any] = {
        "run_id": run_id, "out_dir": str(out_dir), "device": str(dev), "quick": quick, "repeats": repeats,
        "warmup": warmup, "metadata": meta, "timings": timings, "kernels": kernels, "skipped": skipped,
        "failed": failed,
    }  # fmt: skip
    atomic_write_text(out_dir / "bench.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(out_dir / "bench.md", markdown(result))
    log.info("bench: %d target(s), %d failed, written to %s", len(timings), failed, out_dir)
    return result
