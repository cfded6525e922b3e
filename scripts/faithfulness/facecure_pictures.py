"""Image quality of FaceCure's own example cloaks, measured as our cloaks are.

FaceCure's repository (ftramer/FaceCure@35cef5193965) holds a clean photo ``adam.jpg`` (246x246) and two cloaked
112x112 faces made from it, ``adam_lowkey.png`` and ``adam_fawkes.png``. The exact 112x112 source of the
cloaks is not in the repository, so the clean photo is resized to 112x112 (bicubic, Pillow) and compared with
each: L-inf (x255), PSNR, SSIM and DSSIM (cloakbench's centred windows), and LPIPS (AlexNet). Approximate by
construction: the resize is a guess at FaceCure's crop.

    git -C <mirror of ftramer/FaceCure> show HEAD:adam.jpg > adam.jpg   (and the two PNGs)
    python scripts/faithfulness/facecure_pictures.py DIR > benchmarks/results/faithfulness/facecure_pictures.txt
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cloakbench.defenses.budgets import dssim, linf, psnr, ssim
from cloakbench.defenses.lpips import lpips


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def main() -> None:
    folder = Path(sys.argv[1])
    clean = Image.open(folder / "adam.jpg").convert("RGB").resize((112, 112), Image.Resampling.BICUBIC)
    x = _tensor(clean)
    print("cloak | L-inf (x255) | PSNR dB | SSIM | DSSIM | LPIPS alex")
    for name in ("adam_lowkey.png", "adam_fawkes.png"):
        y = _tensor(Image.open(folder / name))
        print(
            f"{name} | {float(linf(x, y)) * 255:.0f} | {float(psnr(x, y)):.2f} | {float(ssim(x, y)):.3f} | "
            f"{float(dssim(x, y)):.3f} | {float(lpips(x, y)):.4f}"
        )


if __name__ == "__main__":
    main()
