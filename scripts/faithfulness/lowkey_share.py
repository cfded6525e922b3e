"""How much LowKey's perceptual (LPIPS) term steers the attack, at LowKey's operating point.

For ``lowkey`` (faithful) and ``lowkey-linf`` (ours), surrogates sface + facenet-casia, on 2 celeb24 faces
(the first photo, in sorted path order, of Barack_Obama and Tom_Hanks): runs the preset's 50 signed-gradient
steps by hand (random start from seed 0, the preset's step size and, where it has one, its L-inf projection)
and at steps 1, 10, 25 and 50 prints per photo the feature term, the weighted perceptual term (the full
objective minus the objective with ``perceptual_weight=0``) and the share of pixels whose step sign the
perceptual term flips (among pixels with a non-zero feature-term gradient). One torch thread.

    python scripts/faithfulness/lowkey_share.py > benchmarks/results/faithfulness/lowkey_share.txt

Writes nothing else. The faces come from $CLOAKBENCH_CELEB24, default <repo>/../shared/datasets/celeb24.
"""

import glob
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.defenses.registry import DEFENSES

REPO = Path(__file__).resolve().parents[2]
CELEB24 = Path(os.environ.get("CLOAKBENCH_CELEB24") or REPO.parent / "shared" / "datasets" / "celeb24").resolve()


def main() -> None:
    torch.set_num_threads(1)
    ids = ["Barack_Obama", "Tom_Hanks"]
    x = torch.stack(
        [
            torch.from_numpy(
                np.asarray(Image.open(sorted(glob.glob(f"{CELEB24}/{i}/*.png"))[0]).convert("RGB"), dtype=np.float32)
                / 255
            ).permute(2, 0, 1)
            for i in ids
        ]
    )
    sur = [RECOGNIZERS.create("sface"), RECOGNIZERS.create("facenet-casia")]
    for name in ("lowkey", "lowkey-linf"):
        full = DEFENSES.create(name, surrogates=sur, name=name)
        bare = DEFENSES.create(name, surrogates=sur, name=name, perceptual_weight=0.0)
        clean = full._features(x, grad=False)
        g = torch.Generator().manual_seed(0)
        adv = x + (2 * torch.rand(x.shape, generator=g) - 1) * full.config.random_start
        for step in range(50):
            a = adv.clone().requires_grad_(True)
            (gf,) = torch.autograd.grad(bare.objective(x, a, clean).sum(), a)
            a = adv.clone().requires_grad_(True)
            (gt,) = torch.autograd.grad(full.objective(x, a, clean).sum(), a)
            if step in (0, 9, 24, 49):
                with torch.no_grad():
                    feat = bare.objective(x, adv, clean)
                    pen = feat - full.objective(x, adv, clean)
                flipped = ((gf.sign() != gt.sign()) & (gf != 0)).float().flatten(1).mean(1)
                print(
                    f"{name} step {step + 1}: feature term {[f'{v:.5f}' for v in feat.tolist()]} "
                    f"weighted perceptual {[f'{v:.5f}' for v in pen.tolist()]} "
                    f"step signs flipped by it {[f'{v:.3f}' for v in flipped.tolist()]}"
                )
            adv = adv + full.config.step_size * gt.sign()
            if full.config.epsilon is not None:
                adv = (x + (adv - x).clamp(-full.config.epsilon, full.config.epsilon)).clamp(0, 1)
            adv = adv.detach()


if __name__ == "__main__":
    main()
