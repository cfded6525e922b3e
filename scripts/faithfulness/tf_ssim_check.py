"""cloakbench's TensorFlow-style SSIM (``budgets.ssim_tf``) against TensorFlow's own ``tf.image.ssim``.

Two steps, because TensorFlow is not a dependency of cloakbench (run the second in an environment that has
``tensorflow-cpu`` and Pillow, without torch):

    python scripts/faithfulness/tf_ssim_check.py make PAIRS.npz      # cloakbench's venv: pairs and our SSIM
    python scripts/faithfulness/tf_ssim_check.py tf PAIRS.npz        # TensorFlow's venv: its SSIM and the gap

The pairs: the first photo of 3 celeb24 identities (112x112) against itself plus uniform noise of +-8/255
(seeded), and 5 random 20x24 pairs. Fawkes calls ``tf.image.ssim(x, y, max_val=255)`` on 0..255 images; so
does the second step.
"""

import os
import sys
from pathlib import Path

import numpy as np


def make(out: Path) -> None:
    import torch

    from cloakbench.defenses.budgets import ssim_tf
    from cloakbench.images import load_image

    root = Path(
        os.environ.get("CLOAKBENCH_CELEB24", Path(__file__).resolve().parents[2] / "../shared/datasets/celeb24")
    )
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for ident in ("Barack_Obama", "Halle_Berry", "Tom_Hanks"):
        face = load_image(sorted((root / ident).iterdir())[0]).copy()
        x = torch.from_numpy(face).permute(2, 0, 1)[None].float() / 255
        y = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 8 / 255).clamp(0, 1)
        xs.append(x)
        ys.append(y)
    small_x = torch.rand((5, 3, 20, 24), generator=g)
    small_y = torch.rand((5, 3, 20, 24), generator=g)
    faces = (torch.cat(xs), torch.cat(ys))
    ours_faces = ssim_tf(*faces).numpy()
    ours_small = ssim_tf(small_x, small_y).numpy()
    np.savez(
        out, faces_x=faces[0].numpy(), faces_y=faces[1].numpy(), small_x=small_x.numpy(), small_y=small_y.numpy(),
        ours_faces=ours_faces, ours_small=ours_small,
    )  # fmt: skip
    print("ours faces", ours_faces, "small", ours_small)


def tf_check(path: Path) -> None:
    import tensorflow as tf

    data = np.load(path)
    for kind in ("faces", "small"):
        x = np.transpose(data[f"{kind}_x"], (0, 2, 3, 1)) * 255.0
        y = np.transpose(data[f"{kind}_y"], (0, 2, 3, 1)) * 255.0
        theirs = tf.image.ssim(tf.constant(x, tf.float32), tf.constant(y, tf.float32), max_val=255).numpy()
        ours = data[f"ours_{kind}"]
        gap = np.abs(theirs - ours).max()
        print(f"{kind}: tensorflow {tf.__version__} {theirs} ours {ours} max |difference| {gap:.2e}")


if __name__ == "__main__":
    (make if sys.argv[1] == "make" else tf_check)(Path(sys.argv[2]))
