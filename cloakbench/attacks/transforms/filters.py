"""Smoothing filters a tracker may run before recognition: Gaussian blur and the median filter (OpenCV).

Both act on the 8-bit image (:func:`map_uint8`) and ignore the generator (they have no randomness).

Intensity anchors (100 = the strongest setting worth plotting): blur sigma 3.0 and a 9x9 median. On the
112x112 aligned faces of celeb24 they cost 22.9 dB and 24.4 dB mean PSNR against the original (measured on
every 60th face, 2026-11-30), in the 20-25 dB band where the other transforms' anchors also sit (JPEG
quality 1: 20.7 dB, resize 0.25: 25.0 dB, noise sigma 0.1: 20.4 dB), so one intensity means roughly one
amount of damage across transforms. At that point eyes, nose and mouth are smears: a tracker that went
further would ruin its own recognition of clean photos. Intensity is linear in the parameter from the
identity (sigma 0, a 1x1 median) to the anchor, then clipped to 100; neither filter has an identity setting
(sigma must be > 0, the median window >= 3), so neither reaches 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cloakbench.attacks.transforms.base import ConfiguredTransform, map_uint8
from cloakbench.attacks.transforms.twins import GaussianBlurTwin, gaussian_kernel_size
from cloakbench.config import require

BLUR_SIGMA_AT_100 = 3.0
MEDIAN_SIZE_AT_100 = 9


@dataclass(frozen=True, kw_only=True)
class BlurConfig:
    sigma: float = 1.0
    """Standard deviation of the Gaussian, in pixels (> 0)."""
    kernel: int | None = None
    """Odd kernel side in pixels; None: 2 * ceil(3 sigma) + 1 (covers +-3 sigma)."""

    def __post_init__(self) -> None:
        require(math.isfinite(self.sigma) and self.sigma > 0, f"sigma must be a positive number, got {self.sigma}")
        if self.kernel is not None:
            require(
                self.kernel >= 3 and self.kernel % 2 == 1,
                f"kernel must be an odd size >= 3 (or null), got {self.kernel}",
            )

    @property
    def kernel_size(self) -> int:
        return gaussian_kernel_size(self.sigma) if self.kernel is None else self.kernel


class GaussianBlur(ConfiguredTransform[BlurConfig]):
    """``cv2.GaussianBlur`` with the same sigma on both axes and BORDER_REFLECT_101 (OpenCV's default)."""

    config_type = BlurConfig
    default_name = "blur"

    @property
    def intensity(self) -> float:
        return min(self.config.sigma / BLUR_SIGMA_AT_100, 1.0) * 100

    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        k, sigma = self.config.kernel_size, self.config.sigma

        def blur(a: np.ndarray) -> np.ndarray:
            return cv2.GaussianBlur(a, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)

        return map_uint8(images, blur)

    def twin(self) -> GaussianBlurTwin:
        """Separable Gaussian convolution with the same kernel and border (optimisation loops only)."""
        return GaussianBlurTwin(sigma=self.config.sigma, kernel=self.config.kernel_size)


@dataclass(frozen=True, kw_only=True)
class MedianConfig:
    size: int = 3
    """Odd side of the square window in pixels (>= 3)."""

    def __post_init__(self) -> None:
        require(self.size >= 3 and self.size % 2 == 1, f"size must be an odd integer >= 3, got {self.size}")


class MedianFilter(ConfiguredTransform[MedianConfig]):
    """``cv2.medianBlur``: each pixel and channel replaced by the median of its size x size window.

    No twin: a median passes the gradient to one pixel of the window, chosen by a sort, which is not a
    smooth stand-in worth optimising through.
    """

    config_type = MedianConfig
    default_name = "median"

    @property
    def intensity(self) -> float:
        return min((self.config.size - 1) / (MEDIAN_SIZE_AT_100 - 1), 1.0) * 100

    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        size = self.config.size
        return map_uint8(images, lambda a: cv2.medianBlur(a, size))
