"""JPEG recompression with the real codec (Pillow's libjpeg), per image."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from cloakbench.attacks.transforms.base import ConfiguredTransform, map_uint8
from cloakbench.attacks.transforms.twins import JPEGTwin
from cloakbench.config import require

_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


@dataclass(frozen=True, kw_only=True)
class JPEGConfig:
    quality: int = 75
    subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = "4:2:0"  # Pillow's and most web encoders' default

    def __post_init__(self) -> None:
        require(1 <= self.quality <= 100, f"quality must be in 1..100, got {self.quality}")


def jpeg_roundtrip(image: np.ndarray, *, quality: int, subsampling: str) -> np.ndarray:
    """Encode one uint8 RGB [H, W, 3] array as JPEG in memory and decode it back."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=_SUBSAMPLING[subsampling])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.uint8)


class JPEG(ConfiguredTransform[JPEGConfig]):
    config_type = JPEGConfig
    default_name = "jpeg"

    @property
    def intensity(self) -> float:
        return (100 - self.config.quality) / 99 * 100

    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        quality, subsampling = self.config.quality, self.config.subsampling
        return map_uint8(images, lambda a: jpeg_roundtrip(a, quality=quality, subsampling=subsampling))

    def twin(self) -> JPEGTwin:
        """The differentiable JPEG approximation with this quality and subsampling (optimisation loops only)."""
        return JPEGTwin(quality=self.config.quality, subsampling=self.config.subsampling)
