"""Clean accuracy of SFace before and after a tracker's fine-tuning, on 8 celeb24 identities.

The first 8 identities (sorted by name) give 5 training photos each (their first 5) and 3 query photos each
(their next 3). The script prints SFace's nearest-neighbour clean accuracy (each query's most cosine-similar
training photo) before adaptation, then adapts SFace with the named adaptation (seed 0, KEY=VALUE parameters
passed to it; integers stay integers, other values become floats) and prints the time it took, the adapted
model's nearest-neighbour accuracy, its softmax head's accuracy on the queries, and the final training loss
and training accuracy. Two torch threads.

    python scripts/faithfulness/tracker_before_after.py ADAPTATION [KEY=VALUE ...] > OUT

Stored:

    python scripts/faithfulness/tracker_before_after.py end-to-end epochs=1 steps_per_epoch=20 \
        > benchmarks/results/faithfulness/tracker_before_after_faithful.txt
    python scripts/faithfulness/tracker_before_after.py end-to-end-anchored \
        > benchmarks/results/faithfulness/tracker_before_after_anchored.txt

Writes nothing else. The faces come from $CLOAKBENCH_CELEB24, default <repo>/../shared/datasets/celeb24.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cloakbench.attacks.adaptation import ADAPTATIONS, TrainingSet
from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.datasets import load_images, scan_folder

REPO = Path(__file__).resolve().parents[2]
CELEB24 = Path(os.environ.get("CLOAKBENCH_CELEB24") or REPO.parent / "shared" / "datasets" / "celeb24").resolve()


def main() -> None:
    torch.set_num_threads(2)
    by = scan_folder(CELEB24).by_identity()
    ids = sorted(by)[:8]
    train = [r for i in ids for r in by[i][:5]]
    query = [r for i in ids for r in by[i][5:8]]
    xt, xq = load_images(train), load_images(query)
    yt = np.array([r.identity for r in train])
    yq = np.array([r.identity for r in query])
    data = TrainingSet(images=xt, labels=tuple(yt))
    sface = RECOGNIZERS.create("sface")

    def nn_acc(rec):
        et, eq = rec.embed_batched(xt).numpy(), rec.embed_batched(xq).numpy()
        return float((yt[(eq @ et.T).argmax(1)] == yq).mean())

    print("before: NN clean accuracy", nn_acc(sface), flush=True)
    for name, params in [(sys.argv[1], dict(a.split("=") for a in sys.argv[2:]))]:
        params = {k: (int(v) if v.isdigit() else float(v)) for k, v in params.items()}
        t = time.perf_counter()
        ad = ADAPTATIONS.create(name, **params).adapt(sface, data, seed=0)
        s = time.perf_counter() - t
        # FaceCure's head reads the raw features: its scores come from the model up to its softmax
        scores = ad.logits.embed_batched(xq).numpy() if ad.logits is not None else ad.head_scores(
            ad.recognizer.embed_batched(xq).numpy()
        )
        head = np.array(ad.classes)[scores.argmax(1)]
        print(
            f"{name} {params}: {s:.0f} s; NN clean accuracy {nn_acc(ad.recognizer):.3f}; softmax-head accuracy "
            f"{float((head == yq).mean()):.3f}; final train loss {ad.report.final_loss:.3f} "
            f"acc {ad.report.final_train_accuracy:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
