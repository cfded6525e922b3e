"""Fawkes v1.0 "high" as the original bounds it (``fawkes-v1-high``) against the centred variant.

Cloaks 4 celeb24 faces (the first 2 photos of Tom_Hanks and of Halle_Berry, in manifest order) with
``fawkes-v1-high`` and ``fawkes-v1-centred-high`` (surrogates sface + facenet-casia, STEPS steps, seed 0)
and records per photo: seconds per photo (wall time of the batch / 4), DSSIM (centred and the original's
TensorFlow-style ``dssim_tf``), L-inf x255, PSNR, and the cosine distance clean vs cloaked under each surrogate.

    python scripts/faithfulness/fawkes_measure.py STEPS

Writes benchmarks/results/faithfulness/fawkes_measure_steps{STEPS}.json (one object per preset) and prints
the same rows, one line per preset, to stdout. The faces come from $CLOAKBENCH_CELEB24, default
<repo>/../shared/datasets/celeb24. Stored: STEPS=30 and STEPS=150.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.datasets import load_images, scan_folder
from cloakbench.defenses import DEFENSES, quality_report
from cloakbench.defenses.budgets import dssim_tf

REPO = Path(__file__).resolve().parents[2]
CELEB24 = Path(os.environ.get("CLOAKBENCH_CELEB24") or REPO.parent / "shared" / "datasets" / "celeb24").resolve()
RESULTS = REPO / "benchmarks" / "results" / "faithfulness"


def main() -> None:
    steps = int(sys.argv[1])
    m = scan_folder(CELEB24)
    recs = [r for r in m.records if r.identity == "Tom_Hanks"][:2] + [
        r for r in m.records if r.identity == "Halle_Berry"
    ][:2]
    x = load_images(recs)
    ids = [r.identity for r in recs]
    surr = [RECOGNIZERS.create("sface"), RECOGNIZERS.create("facenet-casia")]
    rows = {}
    for name in ["fawkes-v1-high", "fawkes-v1-centred-high"]:
        d = DEFENSES.create(name, surrogates=surr, steps=steps)
        t = time.time()
        out = d.protect(x, ids, generator=torch.Generator().manual_seed(0))
        sec = (time.time() - t) / x.shape[0]
        q = quality_report(x, out)
        row = {
            "seconds_per_photo": sec,
            "dssim_centred": q["dssim"].tolist(),
            "dssim_tf": dssim_tf(x, out).tolist(),
            "linf_255": (q["linf"] * 255).tolist(),
            "psnr": q["psnr"].tolist(),
        }
        for s in surr:
            row[f"cosdist_{s.name}"] = (1 - (s.embed(x) * s.embed(out)).sum(1)).tolist()
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"fawkes_measure_steps{steps}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
