"""Our ``pgd`` defense computes the same iterates as torchattacks' PGD (the reference implementation).

torchattacks.PGD maximises a classifier's cross-entropy; ours maximises the cosine distance to the clean
embedding. :class:`CosineLogits` wraps SFace as a two-class classifier with logits
``[s * cos(f(x), f(x_clean)), 0]`` and label 0: the cross-entropy ``log(1 + exp(-s * cos))`` is then a
decreasing function of the cosine, so per image its gradient is a positive multiple of ours and the
signed steps are the same. Three things have to be right for the iterates to match (each was seen to
break it):

- **the same random start.** Without one, the first step is taken at the clean image, where the cosine
  is at its maximum (1) and its gradient is rounding noise (~1e-11 per pixel): the two implementations
  then pick signs at random (half the pixels agreed) and drift apart, so ``random_start=False`` is no
  basis for a comparison. torchattacks draws its start with ``torch.empty_like(x).uniform_(-eps, eps)``
  from the global generator and ours with ``torch.rand(x.shape, generator=g)``: from the same seed they
  are the same numbers only for a contiguous batch (``empty_like`` keeps the channels-last strides that
  :func:`load_images` returns, and fills them in memory order).
- **a moderate scale s.** With s = 30 the softmax saturates, ``p - 1`` rounds to 0 in float32 and
  torchattacks' gradient vanishes (no step at all); s = 1 keeps it well inside float range.
- **the wrapper in eval mode.** torchattacks puts the model back in training mode after the attack when
  it found it so (a new ``nn.Module`` is); the backbone is SFace's own module, so its BatchNorm layers
  would then use batch statistics for every later embedding, ours included.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchattacks
from torch import nn

from cloakbench.attacks.recognizers import RECOGNIZERS
from cloakbench.attacks.recognizers.base import TorchRecognizer
from cloakbench.datasets import load_images, scan_folder
from cloakbench.defenses import DEFENSES
from cloakbench.defenses.pgd import PGD

EPS, STEP, STEPS, SEED = 8 / 255, 2 / 255, 5, 0


class CosineLogits(nn.Module):
    """A recognizer as a 2-class classifier: logits ``[s * cos(f(x), ref), 0]`` for torchattacks."""

    def __init__(self, recognizer: TorchRecognizer, *, scale: float = 1.0) -> None:
        super().__init__()
        self.recognizer = recognizer
        self.backbone = recognizer.module  # a submodule, so torchattacks finds the device from its parameters
        self.scale = scale
        self.reference: torch.Tensor | None = None
        self.eval()

    def set_reference(self, clean: torch.Tensor) -> None:
        self.reference = self.recognizer.embed(clean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.reference is not None, "set_reference() first"
        cos = (self.recognizer.embed(x, grad=True) * self.reference).sum(dim=1)
        return torch.stack([self.scale * cos, torch.zeros_like(cos)], dim=1)


def real_faces(root: Path, n: int) -> torch.Tensor:
    """The first photo of each of the first ``n`` identities, as a contiguous batch (see the docstring)."""
    firsts = [records[0] for records in scan_folder(root).by_identity().values()][:n]
    assert len(firsts) == n, f"celeb24 has fewer than {n} identities"
    return load_images(firsts).contiguous()


def test_pgd_matches_torchattacks(celeb24_root: Path) -> None:
    sface = RECOGNIZERS.create("sface")
    assert isinstance(sface, TorchRecognizer)
    x = real_faces(celeb24_root, 4)

    ours_defense = DEFENSES.create("pgd", surrogates=[sface], epsilon=EPS, step_size=STEP, steps=STEPS)
    assert isinstance(ours_defense, PGD)
    # the start PGD._protect draws for a batch: torch.rand(shape, generator=...), before quantisation
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(SEED), dtype=x.dtype)
    ours = ours_defense._optimise(x, noise)

    model = CosineLogits(sface)
    model.set_reference(x)
    attack = torchattacks.PGD(model, eps=EPS, alpha=STEP, steps=STEPS, random_start=True)
    torch.manual_seed(SEED)  # torchattacks draws its start from the global generator
    theirs = attack(x, torch.zeros(x.shape[0], dtype=torch.long))

    assert not sface.module.training, "torchattacks left SFace in training mode"
    diff = (ours - theirs).abs()
    # one flipped gradient sign alone moves a pixel by 2 steps (4/255): 1/255 means the same iterates
    assert float(diff.max()) <= 1 / 255, (
        f"max |ours - torchattacks| = {float(diff.max()) * 255:.3f}/255; "
        f"{float((diff > 1e-6).float().mean()):.4%} of pixel values differ"
    )
    assert float((ours - x).abs().max()) <= EPS + 1e-6
    assert float((ours - x).abs().max()) > EPS / 2  # it moved: not two no-ops agreeing
