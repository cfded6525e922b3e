"""What the ``grayscale`` and ``realign`` countermeasures do, on real faces, with the real SFace.

Three measurements, stored as one JSON file (``benchmarks/results/countermeasures_grayscale_realign.json``):

1. ``redetection``: YuNet (then dlib) on every celeb24 crop as it is: how many crops have a face, and the
   similarity (angle, scale, shift of the centre) that takes each crop's alignment to the re-detected one. These
   are the numbers ``realign``'s default jitter bounds and intensity anchors come from.
2. ``transforms``: for each countermeasure setting, on every ``--every``-th face: PSNR(x, T(x)); SFace's cosine
   between the clean photo and T(photo); leave-one-out rank-1 identification (each face queried against all the
   other faces, nearest neighbour by cosine) with the clean pipeline and with T applied to every photo (the
   tracker's whole pipeline); the twin's gap to the real transform where there is a twin (jitter and twin drawn
   from generators with the same seed); the faces detect mode kept as they were (no face).
3. ``protection``: a small suite run with :func:`cloakbench.bench.runner.run_suite` (celeb24, 10 photos per
   identity, 4 protected users, poisoning, nearest neighbour, SFace): PGD at 4/255 made on SFace, plain and robust
   (EOT through the twins of none, grayscale and realign-jitter), against the countermeasures none, grayscale,
   realign (jitter) and realign (detect) on the enrollment photos. Per cell: protection rate, clean accuracy and
   the mean cosine of each clean query to the user's own enrolled photos, cloaked and clean (both through the
   countermeasure): the closer the cloaked one comes to the clean one, the more of the cloak the countermeasure
   undid.

    python scripts/countermeasure_check.py                  # writes the JSON
    python scripts/countermeasure_check.py --skip-suite     # sections 1 and 2 only (about a minute of CPU)
    python scripts/countermeasure_check.py --out FILE --every 10

Cost: about 7 minutes of CPU time on 2 cores, most of it the suite (the stored run: 6 min user + 1 min system, 24 min
of wall time on a machine shared at a load average of 11 to 17). Nothing else is written (the suite's cloaks and
embeddings go to the artifact cache, as every run's do).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cloakbench.attacks.recognizers import RECOGNIZERS, Recognizer
from cloakbench.attacks.transforms import TRANSFORMS
from cloakbench.attacks.transforms.realign import Realign
from cloakbench.bench.metadata import cpu_model
from cloakbench.datasets.align import similarity_transform, template
from cloakbench.datasets.demo import first_detection
from cloakbench.defenses.budgets import psnr
from cloakbench.images import load_image, stack_images

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "results" / "countermeasures_grayscale_realign.json"
SETTINGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("none", "none", {}),
    ("grayscale", "grayscale", {}),
    ("realign-jitter", "realign", {"mode": "jitter"}),
    ("realign-jitter-anchor", "realign", {"mode": "jitter", "rotation": 15.0, "scale": 0.3, "shift": 0.1}),
    ("realign-detect", "realign", {"mode": "detect"}),
)
PGD = {"name": "pgd", "surrogates": ["sface"], "params": {"epsilon": 4 / 255, "steps": 10, "random_start": True}}


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (with uncommitted changes)" if dirty else head


def stats(values: np.ndarray) -> dict[str, float]:
    """Summary of the finite values (PSNR is infinite for an unchanged image: ``n_infinite`` counts those)."""
    all_values = np.asarray(values, dtype=np.float64)
    v = all_values[np.isfinite(all_values)]
    n_infinite = int(np.isinf(all_values).sum())
    if v.size == 0:
        return {"n": 0, "n_infinite": n_infinite}
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "p5": float(np.percentile(v, 5)),
        "median": float(np.median(v)),
        "p95": float(np.percentile(v, 95)),
        "max": float(v.max()),
        "n": int(v.size),
        "n_infinite": n_infinite,
    }


def redetection(images: np.ndarray) -> dict[str, Any]:
    """Detection counts and the crop -> re-detected alignment similarity on every face (uint8 [N, H, W, 3])."""
    realign = TRANSFORMS.create("realign", mode="detect")
    assert isinstance(realign, Realign)
    names, detectors = realign.detectors()
    side = images.shape[2]
    target = template(side)
    centre = np.array([(side - 1) / 2.0] * 2)
    found: dict[str, int] = dict.fromkeys(names, 0)
    missing = 0
    angles, scales, shifts = [], [], []
    for image in images:
        detections, which = first_detection(np.ascontiguousarray(image), names, detectors)
        if not detections:
            missing += 1
            continue
        found[which] += 1
        m = similarity_transform(detections[0].landmarks, target)
        angles.append(float(np.degrees(np.arctan2(m[1, 0], m[0, 0]))))
        scales.append(float(np.hypot(m[0, 0], m[1, 0])))
        shifts.append(m[:, :2] @ centre + m[:, 2] - centre)
    s = np.array(shifts)
    return {
        "faces": int(images.shape[0]),
        "found_by": found,
        "no_face": missing,
        "angle_deg": stats(np.array(angles)),
        "abs_angle_deg": stats(np.abs(angles)),
        "scale": stats(np.array(scales)),
        "abs_scale_change": stats(np.abs(np.array(scales) - 1.0)),
        "shift_x_px": stats(s[:, 0]),
        "shift_y_px": stats(s[:, 1]),
        "abs_shift_x_px": stats(np.abs(s[:, 0])),
        "abs_shift_y_px": stats(np.abs(s[:, 1])),
    }


def rank1(gallery: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-neighbour accuracy: query i against every gallery face but i."""
    sims = queries @ gallery.T
    np.fill_diagonal(sims, -np.inf)
    return float((labels[sims.argmax(axis=1)] == labels).mean())


@torch.no_grad()
def transform_effects(faces: torch.Tensor, labels: np.ndarray, rec: Recognizer) -> list[dict[str, Any]]:
    clean = rec.embed(faces).numpy()
    out = []
    for label, name, params in SETTINGS:
        transform = TRANSFORMS.create(name, **params)
        t0 = time.perf_counter()
        moved = transform.apply(faces, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - t0
        emb = rec.embed(moved).numpy()
        entry: dict[str, Any] = {
            "label": label,
            "name": name,
            "params": params,
            "intensity": transform.intensity,
            "ms_per_image": seconds / faces.shape[0] * 1000,
            "psnr_db": stats(psnr(faces, moved).numpy()),
            "sface_cosine_to_clean": stats((emb * clean).sum(axis=1)),
            "rank1_clean_pipeline": rank1(clean, clean, labels),
            "rank1_transformed_pipeline": rank1(emb, emb, labels),
            "rank1_transformed_queries_clean_gallery": rank1(clean, emb, labels),
        }
        twin = transform.twin()
        if twin is not None:
            approx = twin(faces, generator=torch.Generator().manual_seed(0))
            entry["twin_gap_levels"] = {
                "mean": float((approx - moved).abs().mean()) * 255,
                "max": float((approx - moved).abs().max()) * 255,
            }
            entry["twin_psnr_db"] = stats(psnr(moved, approx).numpy())
        if isinstance(transform, Realign) and params.get("mode") == "detect":
            entry["no_face"] = transform.totals.no_face
            entry["found_by"] = dict(transform.totals.by_detector)
        out.append(entry)
    return out


def protection(celeb24: Path) -> dict[str, Any]:
    from cloakbench.bench.runner import run_suite
    from cloakbench.bench.suite import parse_suite

    countermeasures = [
        {"name": name, "label": label, "params": params}
        for label, name, params in SETTINGS
        if label != "realign-jitter-anchor"
    ]
    robust = {"transforms": ["none", "grayscale", {"name": "realign", "params": {"mode": "jitter"}}]}
    suite_data = {
        "name": "countermeasure-check",
        "dataset": {"source": "folder", "path": str(celeb24), "max_per_identity": 10},
        "protected": {"count": 4},
        "defenses": [
            {**PGD, "label": "pgd-4"},
            {**PGD, "label": "pgd-4-robust", "robust": robust},
        ],
        "recognizers": ["sface"],
        "countermeasures": countermeasures,
        "classifiers": ["nearest-neighbour"],
        "bootstrap": {"resamples": 200},
        "device": "cpu",
    }
    t0 = time.perf_counter()
    result = run_suite(parse_suite(suite_data, where="countermeasure_check suite"))
    keep = (
        "defense", "countermeasure", "status", "n_identities", "n_queries", "protection_rate", "ci_low", "ci_high",
        "clean_accuracy_protected", "clean_accuracy_all", "note",
    )  # fmt: skip
    cells = []
    for row in result.summary:
        cell = {k: row.get(k) for k in keep}
        same = ("seed", "protocol", "defense", "recognizer", "countermeasure", "classifier")
        queries = [q for q in result.queries if all(q[k] == row[k] for k in same)]
        # the clean query's best cosine to the user's own enrolled photos: cloaked (and transformed), and clean
        # (transformed) -- how much of the cloak's push the countermeasure undoes
        cell["true_similarity_mean"] = float(np.mean([q["true_similarity"] for q in queries]))
        cell["true_similarity_clean_mean"] = float(np.mean([q["true_similarity_clean"] for q in queries]))
        cells.append(cell)
    return {"suite": suite_data, "seconds": time.perf_counter() - t0, "cells": cells}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--faces", type=Path, default=PROJECT_ROOT.parent / "shared" / "datasets" / "celeb24",
        help="celeb24-style folder of aligned <identity>/<image>.png faces (default: ../shared/datasets/celeb24)",
    )  # fmt: skip
    parser.add_argument("--every", type=int, default=10, help="transform effects on every Nth face (default 10)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON to write (default {DEFAULT_OUT})")
    parser.add_argument("--skip-suite", action="store_true", help="leave out the protection suite run")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error("--every must be >= 1")
    root = args.faces.resolve()
    paths = sorted(root.glob("*/*.png"))
    if not paths:
        parser.error(f"no <identity>/<image>.png faces under {root}")
    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    arrays = np.stack([load_image(p) for p in paths])
    picked = list(range(0, len(paths), args.every))
    faces = stack_images([arrays[i] for i in picked], what=str(root))
    labels = np.array([paths[i].parent.name for i in picked])
    rec = RECOGNIZERS.create("sface")
    report: dict[str, Any] = {
        "command": shlex.join(["python", "scripts/countermeasure_check.py", *argv]),
        "started": f"{started:%Y-%m-%d %H:%M:%S} UTC",
        "machine": {
            "cpu": cpu_model(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "git": git_revision(),
        },
        "dataset": {"root": root.name, "faces": len(paths), "transform_faces": len(picked), "every": args.every},
        "recognizer": rec.name,
        "redetection": redetection(arrays),
        "transforms": transform_effects(faces, labels, rec),
    }
    if not args.skip_suite:
        report["protection"] = protection(root)
    report["seconds"] = time.perf_counter() - t0
    report["load_average_before_after"] = [list(load_before), list(os.getloadavg())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(f"wrote {args.out} in {report['seconds']:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
