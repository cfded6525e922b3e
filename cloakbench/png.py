"""PNG files and bytes of uint8 ``[H, W, 3]`` RGB arrays (numpy and Pillow only: reading stored grids back for a
report needs no torch)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def save_uint8_png(array: np.ndarray, path: Path) -> None:
    """Write uint8 [H, W, 3] as a lossless PNG, atomically (a temporary file renamed onto ``path``)."""
    from cloakbench.cache import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def encode_png(array: np.ndarray) -> bytes:
    """uint8 [H, W, 3] as lossless PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes back to uint8 [H, W, 3] RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))
