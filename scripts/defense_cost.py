"""Cost per image of every registered defense preset: milliseconds per image and the quality it spent.

Each preset cloaks real celeb24 faces one image at a time (a batch of one, so every image is one timing),
after one warm-up image that is not counted (it pays for one-off work: loading a target pool, first-call
allocations). It reports the median and the 25th-75th percentiles of the per-image time, and the largest
DSSIM and L-inf (x255) of the saved, quantised cloaks (:func:`cloakbench.defenses.quality_report`).

    python scripts/defense_cost.py                          # every preset, 5 images, the GPU if there is one
    python scripts/defense_cost.py --presets pgd noise --images 3 --device cpu
    python scripts/defense_cost.py --grids runs/preset-grids   # and a PNG grid per preset there

Writes ``benchmarks/results/defense_cost_<device>.md`` and ``.json`` (the Markdown table, the machine,
torch's version and threads, the load average before and after, and the exact command). The images are
the first photo of each identity in turn, then the second, and so on; the warm-up image is the first of
them. ``--grids DIR`` also saves ``DIR/<preset>.png`` (originals / cloaks / 10x amplified difference of the
measured images, :func:`cloakbench.reports.grids.cloak_grid`), so every preset's visibility can be judged;
those are face images: keep them out of the repository (``runs/`` is git-ignored).

Surrogates: ``sface``; ``sface`` and ``facenet-casia`` for the presets that use two extractors
(Fawkes v1.0 mid/high) and for LowKey (an ensemble). On CUDA the clock is read after synchronising.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
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
from cloakbench.bench.metadata import cpu_model
from cloakbench.datasets import ImageRecord, load_images, scan_folder
from cloakbench.defenses import DEFENSES, Defense, quality_report
from cloakbench.images import to_uint8
from cloakbench.reports.grids import cloak_grid

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ONE_SURROGATE = ("sface",)
TWO_SURROGATES = ("sface", "facenet-casia")
NOT_PRESETS = {
    "fawkes": "the customisable base entry (its defaults: 1000 steps, DSSIM 0.007, the cost of fawkes-ultra)",
    "fawkes-v1": "the same defaults as fawkes-v1-high",
    "precomputed": "reads cloaked files another tool wrote: it makes no cloak to time",
}


def default_presets() -> list[str]:
    return [name for name in DEFENSES.list() if name not in NOT_PRESETS]


def surrogates_for(name: str) -> tuple[str, ...]:
    entry = DEFENSES.get(name)
    if name == "lowkey" or int(entry.defaults.get("extractors") or 1) > 1:
        return TWO_SURROGATES
    return ONE_SURROGATE


def celeb24_root() -> Path:
    env = os.environ.get("CLOAKBENCH_CELEB24")
    return Path(env) if env else (PROJECT_ROOT.parent / "shared" / "datasets" / "celeb24").resolve()


def pick_records(root: Path, count: int) -> list[ImageRecord]:
    """The first photo of each identity, then the second of each, ... (``count`` records)."""
    groups = list(scan_folder(root).by_identity().values())
    picked: list[ImageRecord] = []
    rank = 0
    while len(picked) < count:
        row = [recs[rank] for recs in groups if rank < len(recs)]
        if not row:
            raise SystemExit(f"{root} has only {len(picked)} images; asked for {count}")
        picked.extend(row[: count - len(picked)])
        rank += 1
    return picked


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' (with uncommitted changes)' if dirty else ''}"


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "git": git_revision(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def steps_of(defense: Defense) -> int | None:
    steps = getattr(getattr(defense, "config", None), "steps", None)
    return steps if isinstance(steps, int) else None


def measure(
    name: str,
    images: torch.Tensor,
    identities: Sequence[str],
    recognizers: dict[str, Recognizer],
    device: str,
    grid_dir: Path | None = None,
) -> dict[str, Any]:
    surrogate_names = surrogates_for(name)
    defense = DEFENSES.create(name, surrogates=[recognizers[s] for s in surrogate_names], name=name)
    times_ms: list[float] = []
    dssim: list[float] = []
    linf: list[float] = []
    warmup_ms = 0.0
    cloaks: list[torch.Tensor] = []
    for i in range(images.shape[0]):
        x = images[i : i + 1]
        sync(device)
        start = time.perf_counter()
        out = defense.protect(x, [identities[i]], generator=torch.Generator().manual_seed(i))
        sync(device)
        elapsed = (time.perf_counter() - start) * 1000
        if i == 0:
            warmup_ms = elapsed
            continue
        times_ms.append(elapsed)
        cloaks.append(out)
        quality = quality_report(x, out)
        dssim.append(float(quality["dssim"].max()))
        linf.append(float(quality["linf"].max()) * 255)
    p25, median, p75 = (float(v) for v in np.percentile(times_ms, [25, 50, 75]))
    if grid_dir is not None:
        from PIL import Image

        grid_dir.mkdir(parents=True, exist_ok=True)
        grid = cloak_grid(to_uint8(images[1:]), to_uint8(torch.cat(cloaks)))
        Image.fromarray(grid).save(grid_dir / f"{name}.png", format="PNG")
    steps = steps_of(defense)
    return {
        "preset": name,
        "surrogates": [s.name for s in defense.surrogates],
        "steps": steps,
        "budget": defense.budget.describe(),
        "images": len(times_ms),
        "ms_per_image": {
            "median": median,
            "p25": p25,
            "p75": p75,
            "iqr": p75 - p25,
            "mean": statistics.fmean(times_ms),
            "all": times_ms,
        },
        "ms_per_step": median / steps if steps else None,
        "warmup_ms": warmup_ms,
        "max_dssim": max(dssim),
        "max_linf_x255": max(linf),
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gpu = f", GPU {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else ""
    lines = [
        f"# Defense cost per image ({m['device']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cpus_usable']} usable of {m['cpu_count']} CPUs{gpu}; torch {m['torch']} "
        f"with {m['torch_threads']} threads; Python {m['python']}; cloakbench {m['git']}. Load average "
        f"(1 min) {report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after. "
        f"{report['started']} to {report['finished']} (UTC).",
        "",
        f"Each preset cloaks {report['settings']['images']} real celeb24 faces one at a time (batch 1) after "
        "one warm-up image; time per image from the call to `protect` to its return (quantised cloak, budget "
        "enforced), median and 25th-75th percentiles; DSSIM and L-inf are the largest over the measured "
        "images, measured on the saved cloak.",
        "",
        "| preset | surrogates | steps | ms/image median | ms/image 25th-75th | ms/step | warm-up ms "
        "| budget | max DSSIM | max L-inf (x255) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in report["results"]:
        t = r["ms_per_image"]
        per_step = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] is not None else "-"
        lines.append(
            f"| {r['preset']} | {', '.join(r['surrogates']) or '-'} | {r['steps'] if r['steps'] else '-'} "
            f"| {t['median']:.1f} | {t['p25']:.1f}-{t['p75']:.1f} | {per_step} | {r['warmup_ms']:.1f} "
            f"| {r['budget']} | {r['max_dssim']:.5f} | {r['max_linf_x255']:.2f} |"
        )
    lines += [
        "",
        "ms/step is the median divided by the preset's steps: it includes each call's fixed work (the paper "
        "Fawkes presets embed the user's photos and rank the target pool's cached centroids on every call; the "
        "pool itself is embedded once, in the warm-up), so it overstates the per-step cost of presets with few "
        "steps.",
    ]
    if report["left_out"]:
        lines += ["", "Registered but not measured: " + "; ".join(f"`{k}`: {v}" for k, v in report["left_out"].items())]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--presets", nargs="+", metavar="NAME", help=f"defense presets (default: all: {' '.join(default_presets())})"
    )
    parser.add_argument("--images", type=int, default=5, help="measured images per preset (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results", help="output folder (default %(default)s)"
    )
    parser.add_argument(
        "--grids", type=Path, metavar="DIR", help="also save DIR/<preset>.png: originals / cloaks / 10x difference"
    )
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be >= 1")
    for name in args.presets or []:
        if name not in DEFENSES:
            parser.error(f"unknown defense {name!r} (known: {', '.join(DEFENSES.list())})")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    presets: list[str] = args.presets or default_presets()
    device: str = args.device
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    load_before = os.getloadavg()

    root = celeb24_root()
    records = pick_records(root, args.images + 1)
    images = load_images(records)
    identities = [r.identity for r in records]

    needed = sorted({s for name in presets for s in surrogates_for(name)})
    recognizers = {s: RECOGNIZERS.create(s).to(device) for s in needed}
    results = []
    for name in presets:
        print(f"{name}: {args.images} images + 1 warm-up on {device} ...", file=sys.stderr, flush=True)
        result = measure(name, images, identities, recognizers, device, args.grids)
        t = result["ms_per_image"]
        print(
            f"  {t['median']:.1f} ms/image (25th-75th {t['p25']:.1f}-{t['p75']:.1f}), max DSSIM "
            f"{result['max_dssim']:.5f}, max L-inf {result['max_linf_x255']:.2f}/255",
            file=sys.stderr,
            flush=True,
        )
        results.append(result)

    report = {
        "command": shlex.join(["python", *sys.argv]),
        "started": started,
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "machine": machine_info(device),
        "settings": {"images": args.images, "warmup_images": 1, "batch": 1, "seeds": "image index"},
        "dataset": {"root": str(root), "images": [r.image_id for r in records[1:]], "warmup": records[0].image_id},
        "results": results,
        "left_out": {k: v for k, v in NOT_PRESETS.items() if k not in presets},
    }
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"defense_cost_{torch.device(device).type}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / f"{stem}.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    print(f"wrote {out_dir / stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
