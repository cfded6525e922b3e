"""The input-transform registry (``TRANSFORMS``)."""

from __future__ import annotations

from typing import Any

from cloakbench.attacks.transforms.base import Identity, InputTransform
from cloakbench.attacks.transforms.filters import BlurConfig, MedianConfig, make_blur, make_median
from cloakbench.attacks.transforms.jpeg import JPEGConfig, make_jpeg
from cloakbench.attacks.transforms.quantization import (
    BitDepthConfig,
    GaussianNoiseConfig,
    make_bit_depth,
    make_gaussian_noise,
)
from cloakbench.attacks.transforms.resize import ResizeConfig, make_resize
from cloakbench.registry import EntryMeta, NoParams, Registry

TRANSFORMS: Registry[InputTransform] = Registry("transform")


def _identity(**config: Any) -> Identity:
    if config:
        from cloakbench.errors import ConfigError

        raise ConfigError(f"transform 'none' takes no parameters, got {sorted(config)}")
    return Identity()


TRANSFORMS.register("none", _identity, meta=EntryMeta(summary="no countermeasure (identity)"), config=NoParams)
TRANSFORMS.register(
    "jpeg",
    make_jpeg,
    config=JPEGConfig,
    runtime_args=("name",),
    meta=EntryMeta(summary="JPEG recompression with Pillow/libjpeg at quality q (default 75, 4:2:0)"),
)
TRANSFORMS.register(
    "blur",
    make_blur,
    config=BlurConfig,
    runtime_args=("name",),
    meta=EntryMeta(
        summary="Gaussian blur with OpenCV at sigma (default 1.0 px; kernel 2*ceil(3*sigma)+1, reflect-101)"
    ),
)
TRANSFORMS.register(
    "median",
    make_median,
    config=MedianConfig,
    runtime_args=("name",),
    meta=EntryMeta(summary="median filter with OpenCV over a size x size window (odd, default 3)"),
)
TRANSFORMS.register(
    "resize",
    make_resize,
    config=ResizeConfig,
    runtime_args=("name",),
    meta=EntryMeta(summary="down-then-up resize with OpenCV by factor in (0, 1] (default 0.5; area down, bilinear up)"),
)
TRANSFORMS.register(
    "bit-depth",
    make_bit_depth,
    config=BitDepthConfig,
    runtime_args=("name",),
    meta=EntryMeta(
        summary="bit-depth reduction to bits per channel (1..8, default 4; feature squeezing)",
        paper="Xu et al., Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks",
        year=2018,
        venue="NDSS",
    ),
)
TRANSFORMS.register(
    "gaussian-noise",
    make_gaussian_noise,
    config=GaussianNoiseConfig,
    runtime_args=("name",),
    meta=EntryMeta(summary="additive Gaussian noise of sigma (0..1 units, default 0.02) from the run's seed, 8-bit"),
)
