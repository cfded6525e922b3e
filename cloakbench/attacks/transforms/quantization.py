"""Colour quantisation and additive noise: bit-depth reduction and Gaussian noise.

Bit-depth reduction (feature squeezing, Xu et al., NDSS 2018) keeps the ``bits`` most significant bits of
each 8-bit channel and puts the pixel at the centre of its level, so the error is symmetric (at most half a
kept level) instead of always negative. Intensity: linear in the bits removed, 8 bits (identity) = 0, 1 bit = 100
(the whole range: nothing fewer exists; 16.9 dB mean PSNR on the celeb24 faces, 4 bits 34.8 dB).

Gaussian noise is added to the 8-bit image, clamped to [0, 1] and rounded to 8 bits again, as a saved image
would be. It is drawn from the generator passed to ``apply`` (never the global RNG): the same seed gives the
same noise. Intensity anchor: sigma 0.1 (25.5 levels; 20.4 dB mean PSNR on the celeb24 faces, in the 20-25 dB
band of the other anchors, see :mod:`cloakbench.attacks.transforms.filters`; three times the 8/255 budget of
the usual L-inf cloaks) is 100; linear in sigma from 0 (the identity up to the 8-bit rounding), clipped.
Noise that strong is plainly visible grain, beyond what a tracker would add to every photo it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cloakbench.attacks.transforms.base import ConfiguredTransform, map_uint8
from cloakbench.config import require
from cloakbench.images import from_uint8, quantize, to_uint8

NOISE_SIGMA_AT_100 = 0.1


@dataclass(frozen=True, kw_only=True)
class BitDepthConfig:
    bits: int = 4
    """Bits kept per channel, 1..8; 8 is the identity."""

    def __post_init__(self) -> None:
        require(1 <= self.bits <= 8, f"bits must be in 1..8, got {self.bits}")


def reduce_bit_depth(array: np.ndarray, bits: int) -> np.ndarray:
    """Keep the ``bits`` high bits of each uint8 value and move it to the centre of its level."""
    if bits == 8:
        return np.array(array, dtype=np.uint8, copy=True)
    shift = 8 - bits
    kept = (array.astype(np.int16) >> shift) << shift
    # The largest result is 256 - 2 ** (shift - 1) <= 255: the clip is a guard, not a saturation.
    centred: np.ndarray = np.clip(kept + (1 << (shift - 1)), 0, 255).astype(np.uint8)
    return centred


class BitDepth(ConfiguredTransform[BitDepthConfig]):
    """Bit-depth reduction to ``bits`` per channel with rounding to the centre of each kept level."""

    config_type = BitDepthConfig
    default_name = "bit-depth"

    @property
    def intensity(self) -> float:
        return (8 - self.config.bits) / 7 * 100

    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        bits = self.config.bits
        return map_uint8(images, lambda a: reduce_bit_depth(a, bits))


@dataclass(frozen=True, kw_only=True)
class GaussianNoiseConfig:
    sigma: float = 0.02
    """Standard deviation in units of the [0, 1] pixel range (0.02 is about 5 levels); 0 is the identity."""

    def __post_init__(self) -> None:
        require(math.isfinite(self.sigma) and self.sigma >= 0, f"sigma must be a number >= 0, got {self.sigma}")


class GaussianNoise(ConfiguredTransform[GaussianNoiseConfig]):
    """Additive i.i.d. Gaussian noise on the 8-bit image, then clamped and rounded to 8 bits."""

    config_type = GaussianNoiseConfig
    default_name = "gaussian-noise"

    @property
    def intensity(self) -> float:
        return min(self.config.sigma / NOISE_SIGMA_AT_100, 1.0) * 100

    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        x = from_uint8(to_uint8(images))
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return quantize(x + self.config.sigma * noise.cpu()).to(images.device)
