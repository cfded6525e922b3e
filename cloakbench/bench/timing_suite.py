"""``cloakbench bench``: throughput of the expensive steps on real models and real faces.

Targets (each timed with :func:`cloakbench.bench.timing.measure`: warm-up calls, then timed repeats, CUDA
synchronised inside the timed region):

- ``embed:<recognizer>`` — ``embed_batched`` of 32 aligned demo faces, for every recognizer whose weights are
  on this machine (``--quick``: sface and facenet-casia). The recognizer splits the 32 into forward passes
  of its preferred batch size (``forward_batch`` in the row's params: 8 on a CPU, where larger batches are
  slower per image, 256 on a GPU); black boxes (ONNX, dlib) run on the CPU whatever the device.
- ``cloak:<defense>`` — ``Defense.protect`` (clean embedding, optimisation, budget, quantisation) of a batch
  of faces with SFace as the surrogate (LowKey: SFace and FaceNet-CASIA): pgd with 10 steps, fawkes-low and
  lowkey. A CPU cannot afford the presets' 50 steps x (warm-up + repeats) in a few minutes, so on the CPU
  those two run :data:`CPU_PRESET_STEPS` steps and say so (``steps`` / ``preset_steps`` in the params);
  ``--quick`` times pgd only, with :data:`QUICK_PGD_STEPS` steps.
- ``jpeg:q75`` — the ``jpeg`` transform (Pillow's libjpeg encode + decode) of 32 faces, on the CPU.

For every target: seconds per call (median, quartiles, IQR, the samples), images/s per sample (median and
IQR), peak memory (on CUDA ``max_memory_allocated`` reset before the target; on the CPU the process's
lifetime max RSS, labelled as such), the profiler's top ops of one more call (self CUDA time on GPU, self CPU
time on CPU) and the system's 1-minute load average when the target's calls started and ended (a number taken
while other work competed for the cores is slower than the machine's; the load says so). On a CUDA
out-of-memory error the target's batch is halved and retried (recorded in ``oom_halvings``). A target that
fails is a row with ``status = failed`` and its error, not a crashed bench.

Everything lands in ``<out>/results.sqlite`` (WAL; tables ``bench_timings``, ``bench_kernels`` and
``bench_metadata``, keyed by a ``run_id`` so a reused folder keeps earlier runs apart; one transaction per
finished target), ``<out>/bench.json`` and ``<out>/bench.md``.
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

from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.bench import metadata
from cloakbench.bench.runner import ModelPool, resolve_device
from cloakbench.bench.store import SqliteFile
from cloakbench.bench.timing import PeakMemory, measure, per_item, run_with_oom_retry, top_kernels
from cloakbench.cache import atomic_write_text
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


@dataclass(frozen=True)
class Target:
    """One thing to time; ``prepare(batch)`` loads what it needs, untimed."""

    name: str
    kind: str  # "embedding", "cloaking" or "transform"
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


def _embed_target(name: str, faces: torch.Tensor, models: ModelPool) -> Target:
    def prepare(batch: int) -> Prepared:
        rec = models.get(name)
        images = faces[:batch]
        return Prepared(
            lambda: rec.embed_batched(images),
            rec.device,
            {"forward_batch": min(batch, rec.preferred_batch_size)},
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
        return Prepared(lambda: jpeg.apply(images, generator=torch.Generator().manual_seed(0)), torch.device("cpu"))

    return Target(f"jpeg:q{JPEG_QUALITY}", "transform", FACES, {"quality": JPEG_QUALITY}, prepare)


def build_targets(faces: torch.Tensor, models: ModelPool, *, quick: bool) -> tuple[list[Target], dict[str, str]]:
    """The targets of a run, and the recognizers left out (name -> reason)."""
    on_cpu = models.device.type == "cpu"
    recognizers, skipped = (list(QUICK_RECOGNIZERS), {}) if quick else available_recognizers()
    targets = [_embed_target(name, faces, models) for name in recognizers]
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


def time_target(
    target: Target, *, run_id: str, warmup: int, repeats: int, quiet: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``bench_timings`` row of one target and its ``bench_kernels`` rows; a target that raises gives a
    ``failed`` row (with its error) and no kernel rows. ``quiet``: no profiler lines on stderr."""

    def attempt(batch: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        prepared = target.prepare(batch)
        device = prepared.device
        load_start = _loadavg()
        with PeakMemory(device) as mem:
            stats = measure(prepared.call, device=device, warmup=warmup, repeats=repeats)
        load_end = _loadavg()
        kernels = top_kernels(prepared.call, device=device, n=TOP_KERNELS, quiet=quiet)
        rate = per_item(stats, batch)
        measured = {
            "device": str(device),
            "batch": batch,
            "median_s": stats.median,
            "q1_s": stats.q1,
            "q3_s": stats.q3,
            "iqr_s": stats.iqr,
            "mean_s": stats.mean,
            "images_per_s_median": rate.median,
            "images_per_s_iqr": rate.iqr,
            "peak_memory_bytes": None if mem.peak is None else mem.peak.bytes,
            "peak_memory_kind": None if mem.peak is None else mem.peak.kind,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "params_json": json.dumps({**target.params, **prepared.params}, sort_keys=True),
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
                               "loadavg_end"))  # fmt: skip
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
    torch_version = (meta.get("packages") or {}).get("torch")
    where = meta.get("gpu_name") or meta.get("cpu")
    lines = [
        f"# cloakbench bench ({result['run_id']})",
        "",
        f"{meta.get('utc_time')}; device {meta.get('device')} ({where}); torch {torch_version}, "
        f"{meta.get('torch_threads')} threads; {result['warmup']} warm-up call(s), {result['repeats']} timed; "
        f"{'quick' if result['quick'] else 'full'} mode.",
        "",
        "| target | device | batch | images/s (median) | images/s IQR | s/call (median) | s/call IQR | peak memory "
        "| load 1 min | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
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
        lines.append(
            f"| {row['target']} | {row['device'] or '—'} | {row['batch']} | {rate} | {rate_iqr} | {secs} | {secs_iqr} "
            f"| {memory} | {load} | {'; '.join(notes)} |"
        )
    lines += [
        "",
        "images/s: batch / seconds of each timed call, then median and IQR of those. Peak memory: CUDA "
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


def run_timing_suite(
    out_dir: Path,
    *,
    device: str = "auto",
    repeats: int,
    warmup: int,
    quick: bool,
    progress: Progress | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Time every target into ``out_dir`` (see the module docstring); returns what ``bench.json`` holds:
    ``run_id``, ``out_dir``, ``metadata``, ``timings`` (the stored rows), ``kernels`` (per target), ``skipped``,
    ``failed`` (how many targets failed). ``quiet``: the profiler prints nothing on stderr either."""
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
    models = ModelPool(dev)
    targets, skipped = build_targets(faces, models, quick=quick)
    timings: list[dict[str, Any]] = []
    kernels: dict[str, list[dict[str, Any]]] = {}
    with BenchStore(out_dir / STORE_FILE) as store:
        for i, target in enumerate(targets, 1):
            say(f"[{i}/{len(targets)}] {target.name}: batch {target.batch}, {warmup} warm-up + {repeats} timed call(s)")
            row, kernel_rows = time_target(target, run_id=run_id, warmup=warmup, repeats=repeats, quiet=quiet)
            store.write_target(row, kernel_rows)
            timings.append(row)
            kernels[target.name] = kernel_rows
            if row["status"] == "ok":
                say(f"[{i}/{len(targets)}] {target.name}: {row['images_per_s_median']:.3g} images/s "
                    f"(IQR {row['images_per_s_iqr']:.2g}) on {row['device']}")  # fmt: skip
            else:
                say(f"[{i}/{len(targets)}] {target.name}: FAILED ({row['error']})")
        meta = metadata.collect(dev, onnx_providers=models.onnx_providers())
        meta["bench"] = {
            "device_requested": device, "repeats": repeats, "warmup": warmup, "quick": quick,
            "timing": "CUDA events with synchronize inside the timed region" if dev.type == "cuda"
            else "time.perf_counter around each call",
            "skipped": skipped,
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
