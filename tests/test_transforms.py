"""JPEG with the real codec, on real faces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cloakbench.attacks.transforms import TRANSFORMS
from cloakbench.defenses.budgets import psnr
from cloakbench.images import load_image, stack_images


@pytest.fixture(scope="module")
def faces(celeb24_root: Path) -> torch.Tensor:
    return stack_images([load_image(p) for p in sorted(celeb24_root.glob("*/*.png"))[::60]])


def test_jpeg_quality_100_is_nearly_the_identity(faces: torch.Tensor) -> None:
    out = TRANSFORMS.create("jpeg", quality=100).apply(faces, generator=torch.Generator())
    assert float(psnr(faces, out).min()) > 40.0  # measured: min 46.7 dB, mean 50.8 dB on these 31 faces (4:2:0)


def test_jpeg_degrades_with_lower_quality_and_is_deterministic(faces: torch.Tensor) -> None:
    means = []
    for q in (95, 75, 30, 5):
        t = TRANSFORMS.create("jpeg", quality=q)
        a = t.apply(faces, generator=torch.Generator().manual_seed(0))
        b = t.apply(faces, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)  # a codec has no randomness
        means.append(float(psnr(faces, a).mean()))
    assert means == sorted(means, reverse=True)


def test_intensity_is_normalised() -> None:
    assert TRANSFORMS.create("jpeg", quality=100).intensity == 0.0
    assert TRANSFORMS.create("jpeg", quality=1).intensity == 100.0
    assert TRANSFORMS.create("none").intensity == 0.0
