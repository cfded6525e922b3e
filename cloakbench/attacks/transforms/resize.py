"""Down-then-up resizing (OpenCV): the photo shrunk by ``factor`` and scaled back to its size.

This is what a tracker does when it stores or matches photos at low resolution: the detail finer than the
small image's pixels is gone. It acts on the 8-bit image (:func:`map_uint8`) and ignores the generator.

Intensity anchor: factor 0.25 (a 112x112 face through 28x28, 1/16 of its pixels) is 100; factor 1 (no
resize, the identity) is 0; linear in 1 - factor between them, clipped. At 0.25 the transform costs 25.0 dB
mean PSNR on the celeb24 faces (measured on every 60th face, 2026-11-30), in the 20-25 dB band of the other
transforms' anchors (see :mod:`cloakbench.attacks.transforms.filters`), and each facial feature is a few
pixels wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cloakbench.attacks.transforms.base import ConfiguredTransform, map_uint8
from cloakbench.attacks.transforms.twins import ResizeTwin, downscaled_size
from cloakbench.config import require

RESIZE_FACTOR_AT_100 = 0.25


@dataclass(frozen=True, kw_only=True)
class ResizeConfig:
    factor: float = 0.5
    """Side of the small image over the original's, in (0, 1]; 1 is the identity."""

    def __post_init__(self) -> None:
        require(math.isfinite(self.factor) and 0 < self.factor <= 1, f"factor must be in (0, 1], got {self.factor}")


class Resize(ConfiguredTransform[ResizeConfig]):
    """Down to round(H * factor) x round(W * factor) (at least 1 px) with INTER_AREA, back up with INTER_LINEAR.

    INTER_AREA averages the pixels each small pixel covers (the right filter for shrinking: no aliasing);
    INTER_LINEAR is bilinear interpolation with half-pixel centres, what most pipelines use to enlarge.
    """

    config_type = ResizeConfig
    default_name = "resize"

    @property
    def intensity(self) -> float:
        return min((1.0 - self.config.factor) / (1.0 - RESIZE_FACTOR_AT_100), 1.0) * 100

    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        h, w = images.shape[-2:]
        small_h, small_w = downscaled_size(h, w, self.config.factor)

        def down_up(a: np.ndarray) -> np.ndarray:
            small = cv2.resize(a, (small_w, small_h), interpolation=cv2.INTER_AREA)
            return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)

        return map_uint8(images, down_up)

    def twin(self) -> ResizeTwin:
        """Area pooling down, bilinear up, to the same sizes (optimisation loops only)."""
        return ResizeTwin(factor=self.config.factor)
