"""The canonical image type used at every boundary.

A batch of images is a ``torch.float32`` tensor of shape ``[B, 3, H, W]``, RGB, with values in
``[0, 1]``. Conversions to what a model, codec or file wants (BGR, uint8, 0..255, mean/std) happen in
adapters, never in callers.

Conversion to uint8 always rounds to the nearest level (a PNG written by any sane tool does the same);
truncation would bias every pixel down by half a level and shift budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cloakbench.errors import ImageContractError

Images = torch.Tensor
"""Alias documenting the contract: float32 [B, 3, H, W], RGB, values in [0, 1]."""


def check_images(images: object, *, what: str = "images", atol: float = 1e-6) -> torch.Tensor:
    """Validate the canonical image contract and return the tensor unchanged.

    Raises :class:`ImageContractError` naming ``what`` and the first violated rule.
    """
    if not isinstance(images, torch.Tensor):
        raise ImageContractError(f"{what}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.float32:
        raise ImageContractError(f"{what}: expected dtype float32, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ImageContractError(f"{what}: expected shape [B, 3, H, W], got {list(images.shape)}")
    if images.numel() == 0:
        return images
    if not bool(torch.isfinite(images.detach()).all()):
        raise ImageContractError(f"{what}: contains NaN or infinite values")
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -atol or hi > 1 + atol:
        raise ImageContractError(f"{what}: values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return images


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to the nearest of the 256 uint8 levels (as saving a PNG does) and return float32 [0, 1]."""
    return torch.round(images.clamp(0.0, 1.0) * 255.0) / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [0, 1] -> uint8 numpy [B, H, W, 3], rounding to the nearest level."""
    arr = torch.round(images.detach().clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 numpy [B, H, W, 3] (or [H, W, 3]) -> float32 [B, 3, H, W] in [0, 1]."""
    if array.dtype != np.uint8:
        raise ImageContractError(f"from_uint8: expected a uint8 array, got {array.dtype}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ImageContractError(f"from_uint8: expected shape [B, H, W, 3], got {list(array.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div_(255.0)


def load_image(path: Path) -> np.ndarray:
    """Read one image file as uint8 RGB [H, W, 3]; greyscale, palette and RGBA become RGB.

    The alpha channel of RGBA/LA images is dropped (face datasets that ship RGBA PNGs have opaque alpha);
    compositing on a colour would invent pixels.
    """
    with Image.open(path) as img:
        img.load()
        rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)


def stack_images(arrays: Sequence[np.ndarray], *, what: str = "images") -> torch.Tensor:
    """Stack same-sized uint8 RGB arrays into one canonical batch."""
    if not arrays:
        return torch.zeros((0, 3, 0, 0), dtype=torch.float32)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ImageContractError(f"{what}: images have different sizes {sorted(shapes)}; align them first")
    return from_uint8(np.stack(arrays))


def save_png(image: torch.Tensor, path: Path) -> None:
    """Write one [3, H, W] or [1, 3, H, W] canonical image as an 8-bit PNG (rounded)."""
    if image.ndim == 3:
        image = image[None]
    check_images(image, what=str(path))
    Image.fromarray(to_uint8(image)[0]).save(path, format="PNG")
