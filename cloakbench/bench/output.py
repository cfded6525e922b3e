"""Writing a run folder: resolved config, metadata, per-image rows, per-cell summaries, Markdown table.

Layout of ``<run>/``::

    results.sqlite    the results store every table below is written from (see cloakbench.bench.store)
    config.yaml       the fully resolved suite
    metadata.json     UTC time, git commit and dirty flag, package versions, device, providers, threads
    manifest.csv      the dataset manifest (image id, identity, path, sha256, split)
    problems.csv      files of the dataset that were left out, and why
    alignment.json    per-photo detection/alignment outcomes (only when the run aligned photos)
    cloaks.csv        one row per cloaked photo: L-inf, L2, PSNR, SSIM, DSSIM
    queries.csv       one row per (cell, query photo): prediction, rank, similarity, clean outcome
    summary.csv       one row per cell, with ``status`` (ok / refused / failed) and ``note``
    summary.md        the summary as a Markdown table, then the oblivious-tracker table
    matrix.md         defense x recognizer protection matrices (the transfer table)
    worst_case.csv/md per protected photo, protected only if every countermeasure of the suite failed
    adaptations.csv   one row per retrained model: training set, epochs, images/s, clean accuracy before/after
    grids/<defense>.png  original / cloaked / 10x amplified difference of the first protected photos

Every file is written to a temporary file and renamed onto its name, so a full disk leaves the previous file
whole (and says so in one line); CSV text cells that a spreadsheet would run as a formula get a leading ``'``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from cloakbench.bench import metadata
from cloakbench.bench.runner import RunResult, resolve_device
from cloakbench.bench.store import STORE_FILE, ResultsStore, disk_full_is_one_line
from cloakbench.bench.suite import Suite
from cloakbench.cache import atomic_write_text
from cloakbench.csv_safe import safe_cell
from cloakbench.png import save_uint8_png
from cloakbench.reports.summaries import attach_quality
from cloakbench.reports.tables import markdown_summary, oblivious_table, protection_matrices
from cloakbench.reports.worst_case import markdown_worst_case, worst_case

SUMMARY_COLUMNS = [
    "seed", "protocol", "defense", "recognizer", "countermeasure", "classifier", "oblivious", "status", "n_identities",
    "n_queries", "protection_rate", "ci_low", "ci_high", "protection_rate_identity_mean", "top5_accuracy",
    "top50_accuracy",
    "clean_accuracy_protected", "clean_accuracy_all", "linf_max", "linf_mean", "l2_mean", "psnr_mean",
    "ssim_mean", "dssim_max", "cloak_s_per_image", "note",
]  # fmt: skip


def sort_cells(suite: Suite, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in the suite's own order: seed, defense, recognizer, countermeasure, classifier."""
    order: dict[str, dict[Any, int]] = {
        "seed": {v: i for i, v in enumerate(suite.seeds)},
        "protocol": {p.value: i for i, p in enumerate(suite.protocols)},
        "defense": {d.label: i for i, d in enumerate(suite.defenses)},
        "recognizer": {r: i for i, r in enumerate(suite.recognizers)},
        "countermeasure": {c.label: i for i, c in enumerate(suite.countermeasures)},
        "classifier": {k: i for i, k in enumerate(suite.classifiers)},
    }
    return sorted(rows, key=lambda r: tuple(order[k].get(r.get(k), -1) for k in order))


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    if columns is None:
        columns = list(rows[0].keys()) if rows else []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else safe_cell(row.get(k))) for k in columns})
    return buffer.getvalue()


def _file_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "_"


def write_run(result: RunResult, out_dir: Path, *, attempts_of: Path | None = None) -> dict[str, Any]:
    """Write the run folder (see module docstring) and return the summary rows with quality attached.

    ``attempts_of``: the results store the rows came from; metadata.json then lists every attempt at the run
    (each with its own metadata) and the wall seconds per stage summed over the store's tasks."""
    with disk_full_is_one_line(attempts_of or out_dir / STORE_FILE):
        return _write_run(result, out_dir, attempts_of)


def _write_run(result: RunResult, out_dir: Path, attempts_of: Path | None) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    suite = result.suite
    summary = sort_cells(suite, attach_quality(result.summary, result.cloaks))
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(suite.to_dict(), sort_keys=False))
    meta = metadata.collect(resolve_device(suite.device), onnx_providers=result.onnx_providers)
    meta["timings_s"] = result.timings
    if attempts_of is not None:
        with ResultsStore(attempts_of) as store:  # the run's own store (read-only would leave -wal/-shm files)
            meta["results_store"] = str(attempts_of)
            meta["stage_seconds"] = store.stage_seconds()
            meta["attempts"] = store.attempts()
    meta["service_queries"] = result.service_usage
    meta["dataset"] = {
        "root": str(result.manifest.root),
        "digest": result.manifest.digest,
        "images": len(result.manifest.records),
        "identities": len(result.manifest.identities),
        "problems": len(result.manifest.problems),
    }
    atomic_write_text(out_dir / "metadata.json", json.dumps(meta, indent=2, default=str))
    result.manifest.write_csv(out_dir / "manifest.csv", splits=result.splits)
    problems = [{"path": str(p.path), "reason": p.reason} for p in result.manifest.problems]
    atomic_write_text(out_dir / "problems.csv", _csv_text(problems, ["path", "reason"]))
    atomic_write_text(out_dir / "cloaks.csv", _csv_text(result.cloaks))
    atomic_write_text(out_dir / "queries.csv", _csv_text(result.queries))
    atomic_write_text(out_dir / "summary.csv", _csv_text(summary, SUMMARY_COLUMNS))
    oblivious = "\n## Oblivious trackers (recognizers that made no part of the cloak)\n\n" + oblivious_table(summary)
    atomic_write_text(out_dir / "summary.md", markdown_summary(summary) + oblivious)
    atomic_write_text(out_dir / "matrix.md", protection_matrices(summary))
    worst = worst_case(
        result.queries, summary, resamples=suite.bootstrap.resamples, confidence=suite.bootstrap.confidence
    )
    atomic_write_text(out_dir / "worst_case.csv", _csv_text(worst))
    atomic_write_text(out_dir / "worst_case.md", markdown_worst_case(worst))
    atomic_write_text(out_dir / "adaptations.csv", _csv_text(result.adaptations))
    if result.alignment is not None:
        atomic_write_text(out_dir / "alignment.json", json.dumps(result.alignment, indent=1))
    for label, grid in result.grids.items():
        save_uint8_png(grid, out_dir / "grids" / f"{_file_name(label)}.png")
    return {"summary": summary, "metadata": meta}
