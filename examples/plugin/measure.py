"""How much each cloak moves SFace's embedding, before and after a tracker's input countermeasures.

    python examples/plugin/measure.py [--photos 8] [--steps 20]

For the first photo of each of the first ``--photos`` celeb24 identities (``$CLOAKBENCH_CELEB24`` or
``../shared/datasets/celeb24``), cloak it with uniform noise, cloakbench's ``pgd`` and this plug-in's ``lowfreq``
(grids 4, 8, 16) at the same L-inf budget of 8/255, then print the median cosine distance between the clean and
the cloaked photo's embedding on ``sface`` and on ``sface-flip``, with no countermeasure and after the tracker
applies the same countermeasure to both photos (blur sigma 1, JPEG quality 75, resize by 0.5). Run it with the
plug-in installed (``pip install examples/plugin``) or from the repository (it adds ``src/`` to the path).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from cloakbench_example_plugin.flip import flip_tta
from cloakbench_example_plugin.lowfreq import make_lowfreq

from cloakbench.api import Defense, InputTransform, Recognizer, create_defense, create_recognizer, create_transform


def photos(count: int) -> torch.Tensor:
    root = Path(os.environ.get("CLOAKBENCH_CELEB24", Path(__file__).resolve().parents[3] / "shared/datasets/celeb24"))
    folders = sorted(p for p in root.iterdir() if p.is_dir())[:count]
    arrays = np.stack([np.asarray(Image.open(sorted(f.iterdir())[0]).convert("RGB")) for f in folders])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


def shift(model: Recognizer, a: torch.Tensor, b: torch.Tensor) -> float:
    return float((1 - (model.embed(a) * model.embed(b)).sum(dim=1)).median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="lowfreq's steps (pgd runs its default 10)")
    args = parser.parse_args()
    x = photos(args.photos)
    sface, flip = create_recognizer("sface"), flip_tta("sface")
    countermeasures: dict[str, InputTransform | None] = {
        "none": None,
        "blur 1": create_transform("blur", sigma=1.0),
        "jpeg 75": create_transform("jpeg", quality=75),
        "resize 0.5": create_transform("resize", factor=0.5),
    }
    defenses: dict[str, Defense] = {
        "noise": create_defense("noise"),
        "pgd": create_defense("pgd", surrogates=[sface]),
        **{
            f"lowfreq grid {g}": make_lowfreq(surrogates=[sface], grid=g, steps=args.steps, name=f"lowfreq-{g}")
            for g in (4, 8, 16)
        },
    }
    print(
        f"median cosine distance clean -> cloaked, {len(x)} photos, surrogate sface, L-inf 8/255 (sface / sface-flip)"
    )
    print("| cloak | s/photo | " + " | ".join(countermeasures) + " |")
    print("|---|---|" + "---|" * len(countermeasures))
    for label, defense in defenses.items():
        start = time.perf_counter()
        cloaked = defense.protect(x, ["user"] * len(x), generator=torch.Generator().manual_seed(0))
        seconds = (time.perf_counter() - start) / len(x)
        cells = []
        for transform in countermeasures.values():
            a, b = x, cloaked
            if transform is not None:
                a = transform.apply(x, generator=torch.Generator().manual_seed(0))
                b = transform.apply(cloaked, generator=torch.Generator().manual_seed(0))
            cells.append(f"{shift(sface, a, b):.3f} / {shift(flip, a, b):.3f}")
        print(f"| {label} | {seconds:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
