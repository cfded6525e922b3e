"""The ``precomputed`` round trip on celeb24 faces: built-in cloaks vs the same cloaks read back from full-size files.

1. Full-size photos are made from celeb24's aligned 112x112 crops: each crop enlarged 1.6-2.4x, rotated by up to 12
   degrees, pasted at a random place into a larger blurred-noise picture and saved as JPEG (quality 95).
2. ``cloakbench protect`` (:func:`cloakbench.protect.protect_folder`) cloaks the protected users' full-size
   enrollment photos with PGD on SFace (10 steps of 2/255 at epsilon 4/255 and 8/255): it detects and aligns each
   face, cloaks the crop and warps the perturbation back into the photo, writing ``<stem>_cloaked.png``. Each
   user's photos are cloaked in one call, in the bench's order, seeded as the bench seeds that user's cloak, so its
   random start is the one the bench draws.
3. One suite on the full-size photos (``dataset: {source: folder, align: true}``) evaluates, per PGD setting, the
   cloak made by the bench on the aligned crops (``builtin``), the files read back with the clean photos' landmarks
   (``precomputed``, the default ``alignment: clean-landmarks``) and with the face detected again in the cloaked
   file (``redetect``). Both PGD runs see the same crops (the same detector and landmarks) from the same random
   start, so ``builtin`` and ``precomputed`` differ only by the round trip through the full-size file: the
   re-alignment loss.

Written: ``benchmarks/results/precomputed_roundtrip.json`` and ``.md``: every cell's protection rate for the three
ways, per-photo pixel differences between the built-in and the read-back cloaks, the embedding shift
(1 - cos(f(cloak), f(clean))) each way on every recognizer, and the budgets measured on the evaluated crops.

    OMP_NUM_THREADS=1 nice -n 19 python scripts/precomputed_roundtrip.py       # ~5 minutes on 2 busy CPU cores
    python scripts/precomputed_roundtrip.py --identities 6 --photos 10 --protected 3 --out /tmp/x.json

Photos, cloaks, the aligned copy and the artifacts go to a temporary folder (and a cache of their own beside it,
sharing the user's fetched weights), deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = PROJECT_ROOT / "benchmarks" / "results" / "precomputed_roundtrip.json"
SETTINGS = (("pgd-4", 4 / 255), ("pgd-8", 8 / 255))  # (label, epsilon); step size 2/255 (PGD's default)
STEPS = 10
WAYS = ("builtin", "precomputed", "redetect")


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


def fullsize_photo(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 112x112 aligned crop enlarged 1.6-2.4x, rotated by up to 12 degrees and pasted into a larger picture."""
    scale, angle = float(rng.uniform(1.6, 2.4)), float(rng.uniform(-12, 12))
    side = int(np.ceil(112 * scale * 1.3))
    height, width = side + int(rng.integers(40, 160)), side + int(rng.integers(40, 160))
    background = cv2.GaussianBlur(rng.integers(40, 220, (height, width, 3)).astype(np.float32), (0, 0), 6)
    matrix = cv2.getRotationMatrix2D((56.0, 56.0), angle, scale)
    centre = (float(rng.uniform(side / 2, width - side / 2)), float(rng.uniform(side / 2, height - side / 2)))
    matrix[:, 2] += (centre[0] - 56.0, centre[1] - 56.0)
    face_f = cv2.warpAffine(face.astype(np.float32), matrix, (width, height), flags=cv2.INTER_CUBIC)
    mask = cv2.warpAffine(np.ones((112, 112), np.float32), matrix, (width, height), flags=cv2.INTER_LINEAR)[..., None]
    return np.clip(np.rint(background * (1 - mask) + face_f * mask), 0, 255).astype(np.uint8)


def one_face_photo(face: np.ndarray, rng: np.random.Generator, detector: Any) -> tuple[np.ndarray, int]:
    """:func:`fullsize_photo`, drawn again (at most 20 times) until the detector finds exactly one face in it, and the
    number of draws: ``protect`` cloaks every face it finds, and a second (false) face would take its share of the
    random start, so the cloaks would no longer be the bench's."""
    for tries in range(1, 21):
        photo = fullsize_photo(face, rng)
        if len(detector.detect(photo)) == 1:
            return photo, tries
    raise RuntimeError("no photo with exactly one detected face in 20 draws")


def round_trip(source: Path, landmarks: np.ndarray, clean: np.ndarray, cloak: np.ndarray) -> np.ndarray:
    """What writing ``cloak`` (an aligned crop) into the full-size photo as ``protect`` does and aligning it again with
    the clean photo's ``landmarks`` gives (to check that the files hold the built-in cloaks, round-tripped)."""
    from cloakbench.datasets.align import align_face, similarity_transform, template
    from cloakbench.images import load_image
    from cloakbench.protect import paste_perturbation

    delta = cloak.astype(np.float32) - clean.astype(np.float32)
    photo = paste_perturbation(load_image(source), [delta], [similarity_transform(landmarks, template(112))])
    return align_face(photo, landmarks, 112)


def own_cache(folder: Path) -> None:
    """Point cloakbench's cache at ``folder``, sharing the user's fetched and converted weights."""
    from cloakbench.cache import ENV_CACHE, cache_root

    user = cache_root()
    folder.mkdir(parents=True)
    for kind in ("files", "converted", "downloads"):
        (user / kind).mkdir(parents=True, exist_ok=True)
        (folder / kind).symlink_to(user / kind, target_is_directory=True)
    os.environ[ENV_CACHE] = str(folder)


def stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64).ravel()
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max())}  # fmt: skip


def run(celeb24: Path, work: Path, identities: int, photos: int, protected: int) -> dict[str, Any]:
    from cloakbench.bench.cache import ArtifactCache
    from cloakbench.bench.runner import CellWorker, derive_seed, make_defense, run_suite
    from cloakbench.bench.suite import parse_suite
    from cloakbench.datasets import YuNetDetector
    from cloakbench.defenses.base import surrogate_shift
    from cloakbench.images import from_uint8, load_image, to_uint8
    from cloakbench.protect import protect_folder

    names = sorted(p.name for p in celeb24.iterdir() if p.is_dir())[:identities]
    users = names[:protected]
    rng = np.random.default_rng(0)
    dataset = work / "photos"
    t0 = time.perf_counter()
    detector = YuNetDetector()
    redrawn = 0
    for ident in names:
        (dataset / ident).mkdir(parents=True)
        for src in sorted((celeb24 / ident).glob("*.png"))[:photos]:
            photo, tries = one_face_photo(load_image(src), rng, detector)
            redrawn += tries - 1
            Image.fromarray(photo).save(dataset / ident / f"{src.stem}.jpg", quality=95)
    timings: dict[str, float] = {"make_photos_s": time.perf_counter() - t0}
    defenses: list[dict[str, Any]] = []
    for label, eps in SETTINGS:
        params = {"epsilon": eps, "steps": STEPS}
        folder = work / f"cloaks-{label}"
        defenses += [
            {"name": "pgd", "label": f"{label}-builtin", "surrogates": ["sface"], "params": params},
            {"name": "precomputed", "label": f"{label}-precomputed", "surrogates": ["sface"],
             "params": {"path": str(folder)}},
            {"name": "precomputed", "label": f"{label}-redetect", "surrogates": ["sface"],
             "params": {"path": str(folder), "alignment": "redetect"}},
        ]  # fmt: skip
    recognizers = ["sface", "facenet-casia"]
    suite = parse_suite(
        {
            "name": "precomputed-roundtrip",
            "dataset": {"source": "folder", "path": str(dataset), "align": True},
            "protected": {"identities": users},
            "defenses": defenses,
            "recognizers": recognizers,
            "classifiers": ["nearest-neighbour", "linear"],
            "protocols": ["poisoning", "evasion"],
            "device": "cpu",
        },
        where="precomputed round trip",
    )
    cache = ArtifactCache(work / "artifacts")
    t0 = time.perf_counter()
    worker = CellWorker(suite, cache=cache)  # aligns the photos and splits them
    data = worker.data
    timings["align_and_load_s"] = time.perf_counter() - t0
    # protect each user's full-size enrollment photos (a folder of their own, in the bench's order) seeded as the
    # bench seeds that user's built-in cloak: both draw PGD's random start alike, so the built-in cloak and the
    # file differ only by the round trip through the full-size photo
    for ident in users:
        (work / "enrollment" / ident).mkdir(parents=True)
        for k in data.train[ident]:
            source = data.sources[data.manifest.records[int(k)].image_id].path
            shutil.copy2(source, work / "enrollment" / ident / source.name)
    protect_rows = []
    for spec in suite.defenses:
        if spec.name != "pgd":
            continue
        label = spec.label.removesuffix("-builtin")
        config = make_defense(spec, data, 0, worker.models).config_dict()
        t0 = time.perf_counter()
        for ident in users:
            report = protect_folder(
                work / "enrollment" / ident, defense="pgd", surrogates=list(spec.surrogates), params=dict(spec.params),
                seed=derive_seed(0, ident, config), device="cpu", out_dir=work / f"cloaks-{label}" / ident,
            )  # fmt: skip
            for p in report.photos:
                protect_rows.append({"setting": label, "photo": f"{ident}/{p.source.name}", "status": p.status,
                                     "max_change_levels": p.max_change, "detail": p.detail})  # fmt: skip
        timings[f"protect_{label}_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = run_suite(suite, cache=cache)
    timings["suite_s"] = time.perf_counter() - t0
    made = worker.cloaks(0)
    failed = [r for r in result.summary if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"cells not ok: {[(r['defense'], r['recognizer'], r['note']) for r in failed]}")

    cells = []
    by_key = {(r["defense"], r["recognizer"], r["protocol"], r["classifier"]): r for r in result.summary}
    for label, _ in SETTINGS:
        for r in result.summary:
            if r["defense"] != f"{label}-builtin":
                continue
            key = (r["recognizer"], r["protocol"], r["classifier"])
            rates = {w: by_key[(f"{label}-{w}", *key)]["protection_rate"] for w in WAYS}
            cells.append({
                "setting": label, "recognizer": key[0], "protocol": key[1], "classifier": key[2],
                "oblivious": bool(r["oblivious"]), "n_queries": r["n_queries"],
                "clean_accuracy_protected": r["clean_accuracy_protected"],
                **{f"protection_{w}": rates[w] for w in WAYS},
                "precomputed_minus_builtin": rates["precomputed"] - rates["builtin"],
                "redetect_minus_builtin": rates["redetect"] - rates["builtin"],
                "note_precomputed": by_key[(f"{label}-precomputed", *key)]["note"],
            })  # fmt: skip
    per_setting: dict[str, Any] = {}
    for label, eps in SETTINGS:
        diff, shifts = [], {w: {rec: [] for rec in recognizers} for w in WAYS}
        simulated = []  # |precomputed - the built-in cloak round-tripped here|: 0 when the files hold the same cloaks
        for ident in users:
            clean = data.images[data.train[ident]]
            arrays = {w: made[f"{label}-{w}"].images[ident] for w in WAYS}
            diff.append(np.abs(arrays["builtin"].astype(np.int16) - arrays["precomputed"].astype(np.int16)))
            clean_u8 = to_uint8(clean)
            for j, k in enumerate(data.train[ident]):
                src = data.sources[data.manifest.records[int(k)].image_id]
                assert src.landmarks is not None
                again = round_trip(src.path, src.landmarks, clean_u8[j], arrays["builtin"][j])
                simulated.append(int(np.abs(again.astype(np.int16) - arrays["precomputed"][j].astype(np.int16)).max()))
            for rec_name in recognizers:
                rec = worker.models.get(rec_name)
                for w in WAYS:
                    shifts[w][rec_name].append(surrogate_shift([rec], clean, from_uint8(arrays[w])).numpy())
        d = np.concatenate([x.reshape(len(x), -1) for x in diff])
        quality = {
            w: {k: stats(np.array([q[k] for q in result.cloaks if q["defense"] == f"{label}-{w}"]))
                for k in ("linf", "l2", "psnr", "dssim")}
            for w in WAYS
        }  # fmt: skip
        mine = [c for c in cells if c["setting"] == label]
        per_setting[label] = {
            "epsilon": eps,
            "pixels_abs_diff_builtin_vs_precomputed_levels": {
                "mean": float(d.mean()),
                "p99": float(np.percentile(d, 99)),
                "max": int(d.max()),
                "per_photo_max": stats(d.max(axis=1)),
            },
            "precomputed_vs_builtin_round_tripped_here_max_levels": max(simulated),
            "embedding_shift": {w: {rec: stats(np.concatenate(v)) for rec, v in shifts[w].items()} for w in WAYS},
            "shift_retained_precomputed_over_builtin": {
                rec: float(
                    np.concatenate(shifts["precomputed"][rec]).mean() / np.concatenate(shifts["builtin"][rec]).mean()
                )
                for rec in recognizers
            },
            "quality_on_evaluated_crops": quality,
            "protection_rate_difference_precomputed_minus_builtin": stats(
                np.array([c["precomputed_minus_builtin"] for c in mine])
            ),
            "protection_rate_difference_abs_max": float(max(abs(c["precomputed_minus_builtin"]) for c in mine)),
            "protection_rate_difference_redetect_minus_builtin": stats(
                np.array([c["redetect_minus_builtin"] for c in mine])
            ),
        }
    return {
        "dataset": {
            "source": "celeb24 crops made into full-size JPEG photos (fullsize_photo in this script)",
            "identities": names,
            "protected": users,
            "photos_per_identity": photos,
            "photos_redrawn_for_a_second_face": redrawn,
            "enrollment_photos_cloaked": int(sum(len(data.train[i]) for i in users)),
            "aligned": (result.alignment or {}).get("counts"),
        },
        "defense": f"pgd on sface, {STEPS} steps of 2/255 from a random start, epsilon {[s for s, _ in SETTINGS]}",
        "timings": timings,
        "protect": protect_rows,
        "settings": per_setting,
        "cells": cells,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# `precomputed` round trip on celeb24 faces",
        "",
        f"Written by `{report['command']}` on {report['started']} ({report['machine']['cpu']}, "
        f"{report['machine']['torch_threads']} torch thread(s), git {report['machine']['git']}); "
        f"{report['seconds']:.0f} s. Numbers: `precomputed_roundtrip.json` beside this file.",
        "",
        f"Dataset: {len(report['dataset']['identities'])} celeb24 identities x "
        f"{report['dataset']['photos_per_identity']} photos made full-size (enlarged 1.6-2.4x, rotated up to 12 "
        "degrees, pasted into a larger picture, JPEG 95); "
        f"{len(report['dataset']['protected'])} protected users, "
        f"{report['dataset']['enrollment_photos_cloaked']} enrollment photos cloaked per defense. "
        f"Defense: {report['defense']}, made by the bench on the aligned crops (`builtin`) and by `cloakbench protect` "
        "on the full-size photos, read back by `precomputed` (clean photos' landmarks) and by `precomputed` with "
        "`alignment: redetect`.",
        "",
        "## Re-alignment loss per setting",
        "",
        "| setting | mean abs pixel diff (levels) | max | SFace shift builtin | precomputed | redetect | "
        "retained (SFace) | retained (FaceNet-CASIA) | mean rate diff (precomputed - builtin) | max abs rate diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, s in report["settings"].items():
        px = s["pixels_abs_diff_builtin_vs_precomputed_levels"]
        sh = s["embedding_shift"]
        ret = s["shift_retained_precomputed_over_builtin"]
        lines.append(
            f"| {label} | {px['mean']:.3f} | {px['max']} | {sh['builtin']['sface']['mean']:.3f} | "
            f"{sh['precomputed']['sface']['mean']:.3f} | {sh['redetect']['sface']['mean']:.3f} | {ret['sface']:.3f} | "
            f"{ret['facenet-casia']:.3f} | {s['protection_rate_difference_precomputed_minus_builtin']['mean']:+.3f} | "
            f"{s['protection_rate_difference_abs_max']:.3f} |"
        )
    lines += [
        "",
        "Shift: mean cosine distance 1 - cos(f(cloak), f(clean)) over the cloaked enrollment photos; retained: "
        "precomputed's mean over builtin's. The files hold the built-in cloaks: writing each built-in cloak into its "
        "full-size photo as `protect` does and aligning it again gives the `precomputed` crop to within "
        + ", ".join(
            f"{s['precomputed_vs_builtin_round_tripped_here_max_levels']} level(s) ({label})"
            for label, s in report["settings"].items()
        )
        + ".",
        "",
        "## Protection rate per cell",
        "",
        "| setting | recognizer | protocol | classifier | clean acc. | builtin | precomputed | redetect |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cells"]:
        lines.append(
            f"| {c['setting']} | {c['recognizer']}{'' if not c['oblivious'] else ' (oblivious)'} | {c['protocol']} | "
            f"{c['classifier']} | {c['clean_accuracy_protected']:.3f} | {c['protection_builtin']:.3f} | "
            f"{c['protection_precomputed']:.3f} | {c['protection_redetect']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--faces", type=Path, default=PROJECT_ROOT.parent / "shared" / "datasets" / "celeb24",
        help="celeb24-style folder of aligned <identity>/<image>.png faces (default: ../shared/datasets/celeb24)",
    )  # fmt: skip
    parser.add_argument("--identities", type=int, default=8, help="identities (the first, sorted; default 8)")
    parser.add_argument("--photos", type=int, default=10, help="photos per identity (default 10)")
    parser.add_argument("--protected", type=int, default=4, help="protected users among them (default 4)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON to write (default {DEFAULT_OUT}; .md beside)"
    )
    args = parser.parse_args(argv)
    if not 2 <= args.protected <= args.identities or args.photos < 4:
        parser.error("need 2 <= --protected <= --identities and --photos >= 4")
    from cloakbench.bench.metadata import cpu_model

    started = datetime.now(timezone.utc)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="precomputed-roundtrip-") as tmp:
        own_cache(Path(tmp) / "cache")
        body = run(args.faces.resolve(), Path(tmp), args.identities, args.photos, args.protected)
    report: dict[str, Any] = {
        "command": shlex.join(["python", "scripts/precomputed_roundtrip.py", *argv]),
        "started": f"{started:%Y-%m-%d %H:%M:%S} UTC",
        "machine": {
            "cpu": cpu_model(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "git": git_revision(),
        },
        **body,
        "seconds": time.perf_counter() - t0,
        "load_average_before_after": [list(load_before), list(os.getloadavg())],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    sys.stdout.write(f"wrote {args.out} and {args.out.with_suffix('.md')} in {report['seconds']:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
