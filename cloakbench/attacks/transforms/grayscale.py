"""Greyscale conversion: the tracker's cheapest filter, with Pillow's ``convert("L")``.

Which greyscale. ITU-R BT.601 luma, ``L = 0.299 R + 0.587 G + 0.114 B`` on the 8-bit values, rounded (Pillow
computes it in 16-bit fixed point, ``(19595 R + 38470 G + 7471 B + 32768) >> 16``). It is what "convert to
greyscale" means in the libraries a scraper uses (Pillow's ``"L"``, OpenCV's ``COLOR_RGB2GRAY``: they differ on one
pixel in about 170,000 on every 5th celeb24 face, by one level, measured while writing this module) and it is
exactly the Y channel JPEG stores, so a greyscale tracker keeps what a JPEG's luma plane keeps and drops all of its
chroma. (BT.709's weights, 0.2126 / 0.7152 / 0.0722, are HDTV's; scikit-image's ``rgb2gray`` uses weights close to
them, but Pillow, OpenCV and libjpeg, what a scraping pipeline decodes and converts with, use BT.601's.) The luma is
copied to all three channels, so the output keeps the recognizers' RGB contract (``[B, 3, H, W]``); a recognizer
that was trained on colour photos sees a grey one.

What it does to a cloak. A cloak made on a greyscale photo adds colour: the perturbation is in general
different on R, G and B, so the cloaked photo is no longer grey. Converting to greyscale keeps only the
cloak's luma component ``0.299 dR + 0.587 dG + 0.114 dB`` and removes its chroma part, on every photo, grey or
colour. A cloak that must survive a greyscale tracker has to live in the luma.

The transform is deterministic (the generator is ignored). Intensity: 100, a constant. It has no weaker setting,
and its damage sits in the 20-25 dB band of the other transforms' anchors (see
:mod:`cloakbench.attacks.transforms.filters`): 20.1 dB mean PSNR against the original (median 19.9 dB) on the 177
colour faces among every 10th celeb24 face (7 of those 184 are grey already and come through unchanged;
``benchmarks/results/countermeasures_grayscale_realign.json``, ``scripts/countermeasure_check.py``, 2026-12-02,
Pillow 13.0). SFace still knows the faces: cosine 0.965 on average (lowest 0.896) between a photo's embedding and
its greyscale copy's, and leave-one-out rank-1 identification stays at 1.00 on those 184 faces (same artifact).

Twin: :class:`~cloakbench.attacks.transforms.twins.GrayscaleTwin`, the same linear map without the 8-bit
roundings, so it is exactly differentiable and within one level of the real output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cloakbench.attacks.transforms.base import ConfiguredTransform, map_uint8
from cloakbench.attacks.transforms.twins import GrayscaleTwin

GRAYSCALE_INTENSITY = 100.0


@dataclass(frozen=True, kw_only=True)
class GrayscaleConfig:
    """``grayscale`` takes no parameters."""


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """One uint8 RGB ``[H, W, 3]`` image through Pillow's ``convert("L")``, the luma copied to three channels."""
    luma = np.asarray(Image.fromarray(image).convert("L"), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(luma[:, :, None], 3, axis=2))


class Grayscale(ConfiguredTransform[GrayscaleConfig]):
    """BT.601 luma with Pillow (``Image.convert("L")``), copied to R, G and B."""

    config_type = GrayscaleConfig
    default_name = "grayscale"

    @property
    def intensity(self) -> float:
        return GRAYSCALE_INTENSITY

    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        return map_uint8(images, to_grayscale)

    def twin(self) -> GrayscaleTwin:
        """The same linear map in floating point (optimisation loops only)."""
        return GrayscaleTwin()
