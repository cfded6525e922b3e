"""LowKey as the original runs it (``lowkey``) against our L-inf 0.05 variant (``lowkey-linf``).

Cloaks 4 celeb24 faces (the first photo, in sorted path order, of Barack_Obama, Drew_Barrymore, Keanu_Reeves
and Tom_Hanks) with each named preset (default: lowkey and lowkey-linf; surrogates sface + facenet-casia,
seed 0, the preset's own 50 steps unless $STEPS says otherwise, $THREADS torch threads, default 1) and prints
per photo and mean: L-inf, PSNR, SSIM, DSSIM, LPIPS (AlexNet), the cosine distance clean vs cloaked under
each surrogate, and the largest L-inf x255; the header line carries the steps, the budget and the wall time.

    python scripts/faithfulness/lowkey_measure.py [PRESET ...] > benchmarks/results/faithfulness/lowkey_measure.txt

Writes nothing else. The faces come from $CLOAKBENCH_CELEB24, default <repo>/../shared/datasets/celeb24.
The stored output is the default run (no PRESET, STEPS and THREADS unset).
"""

import glob
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.defenses.budgets import quality_report
from cloakbench.defenses.lpips import lpips
from cloakbench.defenses.registry import DEFENSES

REPO = Path(__file__).resolve().parents[2]
CELEB24 = Path(os.environ.get("CLOAKBENCH_CELEB24") or REPO.parent / "shared" / "datasets" / "celeb24").resolve()


def main() -> None:
    steps = int(os.environ.get("STEPS", "50"))
    ids = ["Barack_Obama", "Drew_Barrymore", "Keanu_Reeves", "Tom_Hanks"]
    files = [sorted(glob.glob(f"{CELEB24}/{i}/*.png"))[0] for i in ids]
    x = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
            for f in files
        ]
    )
    sur = [RECOGNIZERS.create("sface"), RECOGNIZERS.create("facenet-casia")]
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    for name in sys.argv[1:] or ["lowkey", "lowkey-linf"]:
        d = DEFENSES.create(name, surrogates=sur, name=name, **({"steps": steps} if steps != 50 else {}))
        t = time.time()
        out = d.protect(x, ids, generator=torch.Generator().manual_seed(0))
        dt = time.time() - t
        q = quality_report(x, out)
        with torch.no_grad():
            lp = lpips(x, out)
            cos = [1 - (s.embed(x) * s.embed(out)).sum(1) for s in sur]
        print(f"== {name} steps={steps} budget={d.budget.describe()} time={dt:.0f}s")
        for k in ("linf", "psnr", "ssim", "dssim"):
            v = q[k]
            print(f"  {k}: " + " ".join(f"{float(a):.4f}" for a in v) + f"  mean {float(v.mean()):.4f}")
        print("  lpips: " + " ".join(f"{float(a):.4f}" for a in lp) + f"  mean {float(lp.mean()):.4f}")
        for s, c in zip(sur, cos, strict=True):
            print(
                f"  cosine distance {s.name}: "
                + " ".join(f"{float(a):.3f}" for a in c)
                + f"  mean {float(c.mean()):.3f}"
            )
        print(f"  linf*255 max {float(q['linf'].max()) * 255:.1f}")


if __name__ == "__main__":
    main()
