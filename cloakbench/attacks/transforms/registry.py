"""The input-transform registry (``TRANSFORMS``)."""

from __future__ import annotations

from typing import Any

from cloakbench.attacks.transforms.base import ConfiguredTransform, Identity, InputTransform
from cloakbench.attacks.transforms.filters import GaussianBlur, MedianFilter
from cloakbench.attacks.transforms.grayscale import Grayscale
from cloakbench.attacks.transforms.jpeg import JPEG
from cloakbench.attacks.transforms.quantization import BitDepth, GaussianNoise
from cloakbench.attacks.transforms.realign import Realign
from cloakbench.attacks.transforms.resize import Resize
from cloakbench.registry import EntryMeta, NoParams, Registry

TRANSFORMS: Registry[InputTransform] = Registry("transform")


def _identity(**config: Any) -> Identity:
    if config:
        from cloakbench.errors import ConfigError

        raise ConfigError(f"transform 'none' takes no parameters, got {sorted(config)}")
    return Identity()


def _register(cls: type[ConfiguredTransform[Any]], meta: EntryMeta) -> None:
    TRANSFORMS.register(cls.default_name, cls.make, config=cls.config_type, runtime_args=("name",), meta=meta)


TRANSFORMS.register("none", _identity, meta=EntryMeta(summary="no countermeasure (identity)"), config=NoParams)
_register(JPEG, EntryMeta(summary="JPEG recompression with Pillow/libjpeg at quality q (default 75, 4:2:0)"))
_register(
    GaussianBlur,
    EntryMeta(summary="Gaussian blur with OpenCV at sigma (default 1.0 px; kernel 2*ceil(3*sigma)+1, reflect-101)"),
)
_register(MedianFilter, EntryMeta(summary="median filter with OpenCV over a size x size window (odd, default 3)"))
_register(
    Resize,
    EntryMeta(summary="down-then-up resize with OpenCV by factor in (0, 1] (default 0.5; area down, bilinear up)"),
)
_register(
    BitDepth,
    EntryMeta(
        summary="bit-depth reduction to bits per channel (1..8, default 4; feature squeezing)",
        paper="Xu et al., Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks",
        year=2018,
        venue="NDSS",
    ),
)
_register(
    GaussianNoise,
    EntryMeta(summary="additive Gaussian noise of sigma (0..1 units, default 0.02) from the run's seed, 8-bit"),
)
_register(
    Grayscale,
    EntryMeta(summary="greyscale with Pillow convert('L') (ITU-R BT.601 luma), copied to the 3 channels"),
)
_register(
    Realign,
    EntryMeta(
        summary=(
            "re-alignment: mode jitter (default; seeded random rotation/scale/shift within rotation 4 deg, "
            "scale 0.11, shift 0.03, bilinear) or detect (YuNet/dlib re-detection, re-aligned to the ArcFace template)"
        )
    ),
)
