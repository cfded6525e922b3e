"""How far each differentiable twin is from its real transform, on real faces.

For each twin setting (JPEG quality 95/75/50, blur sigma 1/2, resize factor 0.5/0.75) the script applies the
real transform (:meth:`InputTransform.apply`: Pillow/libjpeg, OpenCV, on 8-bit images) and its twin
(:meth:`InputTransform.twin`) to the same faces and reports, over all of them:

- the mean and the largest absolute gap |twin(x) - real(x)|, in 8-bit levels (x255);
- PSNR(twin(x), real(x)) in dB, mean and minimum over the faces (per-image PSNR, peak 1.0);
- PSNR(x, real(x)), the same for the identity: what a "twin" that did nothing would score. A twin that
  models its transform scores well above it.

    python scripts/twin_gap.py                       # every face of ../shared/datasets/celeb24
    python scripts/twin_gap.py --every 10            # every 10th face (sorted paths)
    python scripts/twin_gap.py --faces DIR           # DIR/<identity>/<image>.png|jpg

Writes a Markdown report (the command, the machine, the table) to stdout; nothing else is written.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

from cloakbench.attacks.transforms import TRANSFORMS, InputTransform
from cloakbench.bench.metadata import cpu_model
from cloakbench.defenses.budgets import psnr
from cloakbench.images import load_image, stack_images

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SETTINGS: tuple[tuple[str, dict[str, object]], ...] = (
    ("jpeg", {"quality": 95}),
    ("jpeg", {"quality": 75}),
    ("jpeg", {"quality": 50}),
    ("blur", {"sigma": 1.0}),
    ("blur", {"sigma": 2.0}),
    ("resize", {"factor": 0.5}),
    ("resize", {"factor": 0.75}),
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def load_faces(root: Path, every: int) -> torch.Tensor:
    paths = sorted(p for p in root.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)[::every]
    if not paths:
        raise SystemExit(f"no images under {root}/<identity>/")
    return stack_images([load_image(p) for p in paths], what=str(root))


@torch.no_grad()
def measure(transform: InputTransform, faces: torch.Tensor, batch: int) -> dict[str, float]:
    twin = transform.twin()
    if twin is None:
        raise SystemExit(f"{transform.name} has no differentiable twin")
    gaps_sum, gaps_max, n_values = 0.0, 0.0, 0
    twin_psnr: list[torch.Tensor] = []
    identity_psnr: list[torch.Tensor] = []
    for start in range(0, faces.shape[0], batch):
        x = faces[start : start + batch]
        real = transform.apply(x, generator=torch.Generator().manual_seed(0))
        approx = twin(x)
        gap = (approx - real).abs()
        gaps_sum += float(gap.sum())
        gaps_max = max(gaps_max, float(gap.max()))
        n_values += gap.numel()
        twin_psnr.append(psnr(real, approx))
        identity_psnr.append(psnr(real, x))
    tp, ip = torch.cat(twin_psnr), torch.cat(identity_psnr)
    return {
        "gap_mean": gaps_sum / n_values * 255,
        "gap_max": gaps_max * 255,
        "twin_psnr_mean": float(tp.mean()),
        "twin_psnr_min": float(tp.min()),
        "identity_psnr_mean": float(ip.mean()),
        "identity_psnr_min": float(ip.min()),
    }


def report(faces: torch.Tensor, root: Path, every: int, argv: Sequence[str], batch: int) -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        "# Differentiable twins vs the real transforms (cpu)",
        "",
        f"Command: `{shlex.join(['python', 'scripts/twin_gap.py', *argv])}`",
        "",
        f"Date: {datetime.now(timezone.utc):%Y-%m-%d} (UTC). Machine: {cpu_model()}, {usable} usable CPUs; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; Python {platform.python_version()}.",
        "",
        f"Faces: {faces.shape[0]} aligned {faces.shape[2]}x{faces.shape[3]} images of {root.name} "
        f"({'all of them' if every == 1 else f'every {every}th of the sorted paths'}).",
        "",
        "Gaps in 8-bit levels (x255); PSNR per image in dB (peak 1.0), mean and minimum over the faces. "
        "`PSNR(x, real)` is the identity's score: a twin that models its transform must beat it.",
        "",
        "| transform | setting | mean abs gap | max abs gap | PSNR(twin, real) mean | min | PSNR(x, real) mean | min |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, params in SETTINGS:
        m = measure(TRANSFORMS.create(name, **params), faces, batch)
        setting = ", ".join(f"{k}={v}" for k, v in params.items())
        lines.append(
            f"| {name} | {setting} | {m['gap_mean']:.3f} | {m['gap_max']:.1f} | {m['twin_psnr_mean']:.2f} "
            f"| {m['twin_psnr_min']:.2f} | {m['identity_psnr_mean']:.2f} | {m['identity_psnr_min']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--faces",
        type=Path,
        default=PROJECT_ROOT.parent / "shared" / "datasets" / "celeb24",
        help="folder of <identity>/<image> faces, all one size (default: ../shared/datasets/celeb24 beside "
        "the repository)",
    )
    parser.add_argument("--every", type=int, default=1, help="use every Nth face of the sorted paths (default 1)")
    parser.add_argument("--batch", type=int, default=128, help="faces per batch (memory only; default 128)")
    args = parser.parse_args(argv)
    if args.every < 1 or args.batch < 1:
        parser.error("--every and --batch must be >= 1")
    root = args.faces.resolve()
    faces = load_faces(root, args.every)
    sys.stdout.write(report(faces, root, args.every, argv, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
