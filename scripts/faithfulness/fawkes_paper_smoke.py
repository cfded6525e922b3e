"""Smoke check of the Fawkes paper version at its lowest preset (``fawkes-min``, its default steps).

Output: benchmarks/results/faithfulness/fawkes_paper_smoke.txt (see that folder's README for the machine).

Cloaks the first 2 Tom_Hanks photos of celeb24 with ``fawkes-min`` (surrogate sface, target pool = celeb24
itself, seed 0) and prints: the chosen target; then the seconds taken (cloaking plus embedding the target's
pool photos), L-inf x255, centred DSSIM and TensorFlow-style ``dssim_tf`` per photo, and each photo's cosine
to the target identity's normalised sface centre before and after cloaking.

    python scripts/faithfulness/fawkes_paper_smoke.py > benchmarks/results/faithfulness/fawkes_paper_smoke.txt

The faces (and the target pool) come from $CLOAKBENCH_CELEB24, default <repo>/../shared/datasets/celeb24.
"""

import os
import time
from pathlib import Path

import torch

from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.datasets import load_images, scan_folder
from cloakbench.defenses import DEFENSES, quality_report
from cloakbench.defenses.budgets import dssim_tf

REPO = Path(__file__).resolve().parents[2]
CELEB24 = Path(os.environ.get("CLOAKBENCH_CELEB24") or REPO.parent / "shared" / "datasets" / "celeb24").resolve()


def main() -> None:
    m = scan_folder(CELEB24)
    x = load_images([r for r in m.records if r.identity == "Tom_Hanks"][:2])
    sface = RECOGNIZERS.create("sface")
    d = DEFENSES.create("fawkes-min", surrogates=[sface], target_pool=str(CELEB24))
    t = time.time()
    out = d.protect(x, ["Tom_Hanks"] * 2, generator=torch.Generator().manual_seed(0))
    q = quality_report(x, out)
    tgt = d.targets["Tom_Hanks"]
    print(tgt)
    pool = d.pool()
    c = torch.nn.functional.normalize(sface.embed(pool.images[tgt.identity]).mean(0), dim=0)
    print(
        time.time() - t,
        q["linf"] * 255,
        q["dssim"],
        dssim_tf(x, out),
        "cos to target before",
        sface.embed(x) @ c,
        "after",
        sface.embed(out) @ c,
    )


if __name__ == "__main__":
    main()
