"""OPOM: protection on unseen test photos (OPOM's ``test_privacy`` pairwise protocol) vs on the fitting photos.

For 4 celeb24 users (Tom_Hanks, Barack_Obama, Tina_Fey, Will_Smith) a mask is fitted with sface on each user's
first 10 photos (seed 0) and applied both to those photos ("fitting") and to the user's next 10 ("unseen").
The other identities' first 10 photos each are the distractors. Each photo is ranked by
:func:`cloakbench.defenses.opom.unseen_photo_ranks` under sface and facenet-casia; per recognizer and split the
script prints the share of (cloaked probe, clean photo) pairs that are protected at top-1 and at top-10, and
the same top-1 share with no mask ("clean protect"), plus the wall time of each implementation.

    python scripts/faithfulness/opom_measure.py [opom|old ...] > benchmarks/results/faithfulness/opom_measure.txt

Default (the stored output): ``opom`` then ``old``. ``opom`` is the current registry preset; ``old`` is
``make_opom`` from ``cloakbench/defenses/opom.py`` as of commit 36c7446 (the implementation before the
OPOM faithfulness change), read with ``git show 36c7446:cloakbench/defenses/opom.py`` into a temporary file
and imported from there, on top of the current cloakbench package; its mask is applied as that version did
(add, clip to [0, 1], quantize). The "old" run therefore needs this repository's git history.
Writes nothing else. The faces come from $CLOAKBENCH_CELEB24, default <repo>/../shared/datasets/celeb24.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.datasets import load_images, scan_folder
from cloakbench.defenses import DEFENSES
from cloakbench.defenses.opom import unseen_photo_ranks
from cloakbench.images import quantize

REPO = Path(__file__).resolve().parents[2]
CELEB24 = Path(os.environ.get("CLOAKBENCH_CELEB24") or REPO.parent / "shared" / "datasets" / "celeb24").resolve()
OLD_COMMIT = "36c7446"
OLD_PATH = "cloakbench/defenses/opom.py"


def load_old(tmp: Path) -> ModuleType:
    """Import ``OLD_PATH`` as of ``OLD_COMMIT`` as the module ``opom_old``."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:{OLD_PATH}"], check=True, capture_output=True
    ).stdout
    path = tmp / "opom_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("opom_old", path)
    assert spec is not None
    assert spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    sys.modules["opom_old"] = old
    spec.loader.exec_module(old)
    return old


def masked(name: str, d: Any, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The photos ``x`` with the mask on: the old version's add-clip-quantize, or the preset's own ``apply``."""
    if name == "old":
        return quantize((x + mask).clamp(0, 1))
    return d.apply(mask, x)


def main(tmp: Path) -> None:
    torch.manual_seed(0)
    which = sys.argv[1:] or ["opom", "old"]
    old = load_old(tmp) if "old" in which else None
    recs = scan_folder(CELEB24).records
    users = ["Tom_Hanks", "Barack_Obama", "Tina_Fey", "Will_Smith"]
    by: dict[str, list[Any]] = {}
    for r in recs:
        by.setdefault(r.identity, []).append(r)
    sface = RECOGNIZERS.create("sface")
    casia = RECOGNIZERS.create("facenet-casia")
    dis_recs = [r for ident, rs in sorted(by.items()) if ident not in users for r in rs[:10]]
    dis_img = load_images(dis_recs)
    evals = {"sface": sface, "facenet-casia": casia}
    dis = {k: v.embed_batched(dis_img) for k, v in evals.items()}
    for name in which:
        tot: dict[tuple[str, str], list[int]] = {}
        t0 = time.time()
        for u in users:
            fit, test = load_images(by[u][:10]), load_images(by[u][10:20])
            if name == "old":
                assert old is not None
                d = old.make_opom(surrogates=[sface])
                mask = d.mask_for(fit, generator=torch.Generator().manual_seed(0))
            else:
                d = DEFENSES.create(name, surrogates=[sface])
                mask = d.fit(fit, generator=torch.Generator().manual_seed(0))
            for ev, rec in evals.items():
                for split, x in (("unseen", test), ("fitting", fit)):
                    r = unseen_photo_ranks(rec.embed(masked(name, d, mask, x)), rec.embed(x), dis[ev])
                    c = unseen_photo_ranks(rec.embed(x), rec.embed(x), dis[ev])
                    key = (ev, split)
                    a = tot.setdefault(key, [0, 0, 0, 0])
                    a[0] += int((r > 1).sum())
                    a[1] += r.numel()
                    a[2] += int((c > 1).sum())
                    a[3] += int((r > 10).sum())
        print(
            f"== {name} ({time.time() - t0:.0f} s; {len(users)} users x 10 fitting / 10 unseen photos; "
            f"{len(dis_recs)} distractors)"
        )
        for (ev, split), (p, n, cp, p10) in sorted(tot.items()):
            print(
                f"{name:16s} {ev:14s} {split:8s} protect top1 {p / n:.3f} ({p}/{n})  top10 {p10 / n:.3f}  "
                f"clean protect {cp / n:.3f}"
            )
        sys.stdout.flush()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp_dir:
        main(Path(tmp_dir))
