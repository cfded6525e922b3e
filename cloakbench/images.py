"""The canonical image type used at every boundary.

A batch of images is a ``torch.float32`` tensor of shape ``[B, 3, H, W]``, RGB, with values in
``[0, 1]``. Conversions to what a model, codec or file wants (BGR, uint8, 0..255, mean/std) happen in
adapters, never in callers.

Conversion to uint8 always rounds to the nearest level (a PNG written by any sane tool does the same);
truncation would bias every pixel down by half a level and shift budgets.

Every image file is read by :func:`decode_image` (:func:`load_image` for a path): datasets (scanning and loading),
alignment, ``protect`` and the timing suite. It returns uint8 RGB ``[H, W, 3]``, upright, whatever the file holds:

- the EXIF orientation (or XMP's, as Pillow reads it) is applied, so a sideways phone photo is upright in every
  loader, aligned or not;
- samples are scaled to 0..255 by the true range of their mode, rounding: 16-bit grey (``I;16*``) and 16-bit
  PGM by 65535 (Pillow's own conversion clips them to white); 32-bit integer (``I``) by the range its TIFF
  declares (bits per sample, signed or not) and by 65535 in any other format (Pillow opens 16-bit PGM and old
  16-bit PNG files as ``I``); floating point (``F``) as ``[0, 1]`` when every value lies there, else as
  ``[0, 255]`` (Pillow's own scale); 48/64-bit RGB(A) and 32-bit grey+alpha PNG and TIFF files, which Pillow
  opens as 8-bit by dropping the low byte (a truncation), are decoded at full depth by OpenCV;
- values with no known range (NaN, negative, beyond the declared range, ``F`` above 255) and 16-bit colour in
  formats other than PNG and TIFF are refused with :class:`ImageDecodeError` (the dataset lists such a file
  as a problem and leaves it out), never clipped;
- every other mode (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``, ``LAB``,
  ``HSV``, ...) goes through Pillow's conversion to RGB; alpha is dropped (see :func:`load_image`).

:data:`DECODER_VERSION` names these rules: anything cached from decoded pixels should carry it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

from cloakbench.errors import ImageContractError

Images = torch.Tensor
"""Alias documenting the contract: float32 [B, 3, H, W], RGB, values in [0, 1]."""

DECODER_VERSION = 2
"""Version of :func:`decode_image`'s rules (1: Pillow's ``convert("RGB")``, which made 16-bit images white and
ignored EXIF orientation outside alignment; 2: the rules of the module docstring)."""


class ImageDecodeError(ImageContractError):
    """An image file decodes, but its pixels have no known range (or depth) to scale to 0..255."""


def check_image_layout(images: object, *, what: str = "images") -> torch.Tensor:
    """The type, dtype and shape rules of the contract only: no value is read (so no host synchronisation on a
    GPU; :func:`check_images` checks the values too). Returns the tensor unchanged."""
    if not isinstance(images, torch.Tensor):
        raise ImageContractError(f"{what}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.float32:
        raise ImageContractError(f"{what}: expected dtype float32, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ImageContractError(f"{what}: expected shape [B, 3, H, W], got {list(images.shape)}")
    return images


def check_images(images: object, *, what: str = "images", atol: float = 1e-6) -> torch.Tensor:
    """Validate the canonical image contract and return the tensor unchanged.

    Raises :class:`ImageContractError` naming ``what`` and the first violated rule.
    """
    tensor = check_image_layout(images, what=what)
    if tensor.numel() == 0:
        return tensor
    if not bool(torch.isfinite(tensor.detach()).all()):
        raise ImageContractError(f"{what}: contains NaN or infinite values")
    lo, hi = float(tensor.detach().min()), float(tensor.detach().max())
    if lo < -atol or hi > 1 + atol:
        raise ImageContractError(f"{what}: values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return tensor


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
    """Read one image file as uint8 RGB [H, W, 3], upright (see :func:`decode_image`).

    The alpha channel of RGBA/LA images is dropped (face datasets that ship RGBA PNGs have opaque alpha);
    compositing on a colour would invent pixels. Raises ``OSError`` when the file cannot be read, Pillow's
    errors when it cannot be decoded and :class:`ImageDecodeError` when its pixels have no known range.
    """
    return decode_image(Path(path).read_bytes())


_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transpose that makes the stored pixels upright (as ``ImageOps.exif_transpose``)."""

_WIDE_FORMATS = frozenset({"PNG", "TIFF"})
"""Formats whose 16-bit colour samples are decoded at full depth (by OpenCV); others are refused."""


def decode_image(data: bytes) -> np.ndarray:
    """Decode the bytes of one image file to uint8 RGB ``[H, W, 3]``, upright, by the rules of the module docstring."""
    with Image.open(io.BytesIO(data)) as img:
        raw = _raw_mode(img)  # read before load(), which forgets how the file stored its samples
        img.load()
        orientation = img.getexif().get(ExifTags.Base.Orientation)
        if img.mode in ("L", "LA", "RGB", "RGBA") and ";16" in raw:
            if img.format not in _WIDE_FORMATS:
                raise ImageDecodeError(
                    f"16 bits per sample ({raw}) in a {img.format} file: only PNG and TIFF files are read at that "
                    "depth (convert it to a 16-bit PNG)"
                )
            rgb = _decode_wide(data, img.size)
        else:
            rgb = to_rgb_uint8(img)
    transpose = _TRANSPOSE_FOR_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    if transpose is not None:
        rgb = np.asarray(Image.fromarray(rgb).transpose(transpose), dtype=np.uint8)
    return rgb


def to_rgb_uint8(img: Image.Image) -> np.ndarray:
    """The pixels of a decoded Pillow image as uint8 RGB ``[H, W, 3]``, each mode scaled by its true range.

    Orientation is not applied here (:func:`decode_image` does it), nor are 16-bit colour samples recovered:
    Pillow holds them as 8 bits already.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        levels = _round_levels(np.asarray(img).astype(np.float64) / 257.0)
    elif mode == "I":
        levels = _round_levels(_scaled_integers(img))
    elif mode == "F":
        levels = _round_levels(_scaled_floats(np.asarray(img, dtype=np.float64)))
    else:
        try:
            rgb = img.convert("RGB")
        except ValueError as exc:
            raise ImageDecodeError(f"images of mode {mode} have no conversion to RGB ({exc})") from None
        return np.asarray(rgb, dtype=np.uint8)
    return np.repeat(levels[:, :, None], 3, axis=2)


def _round_levels(values: np.ndarray) -> np.ndarray:
    """Values in [0, 255] (float) rounded to uint8 levels."""
    levels: np.ndarray = np.rint(values).astype(np.uint8)
    return levels


def _raw_mode(img: Image.Image) -> str:
    """How the file stores its samples (Pillow's raw mode, e.g. ``RGB;16B``), or ``""`` when not known."""
    tile = getattr(img, "tile", None)
    if not tile:
        return ""
    args = tile[0][3]
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def _integer_range(img: Image.Image) -> int:
    """The largest value of a 32-bit integer image's samples: what its TIFF declares, else 65535."""
    tags = getattr(img, "tag_v2", None) if img.format == "TIFF" else None
    if tags is None:
        return 65535
    bits, sample_format = tags.get(258, 32), tags.get(339, 1)  # BitsPerSample, SampleFormat (2: signed)
    bits = bits[0] if isinstance(bits, tuple) else bits
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    return int(2 ** (int(bits) - 1) - 1 if sample_format == 2 else 2 ** int(bits) - 1)


def _scaled_integers(img: Image.Image) -> np.ndarray:
    values = np.asarray(img).astype(np.float64)
    top = _integer_range(img)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if lo < 0 or hi > top:
        raise ImageDecodeError(
            f"32-bit integer pixels in [{lo:.0f}, {hi:.0f}] lie outside the range 0..{top} of the file: "
            "no known scale to 8 bits"
        )
    return values * (255.0 / top)


def _scaled_floats(values: np.ndarray) -> np.ndarray:
    if values.size == 0:
        return values
    if not np.isfinite(values).all():
        raise ImageDecodeError("floating-point pixels hold NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 or hi > 255:
        raise ImageDecodeError(
            f"floating-point pixels in [{lo:.4g}, {hi:.4g}]: neither [0, 1] nor [0, 255], no known scale to 8 bits"
        )
    return values * 255.0 if hi <= 1 else values


def _decode_wide(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """16-bit samples of a PNG or TIFF file, decoded by OpenCV at full depth, as rounded uint8 RGB."""
    import cv2

    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)  # never rotates
    width, height = size
    if array is None or array.dtype != np.uint16 or array.shape[:2] != (height, width):
        got = "nothing" if array is None else f"{array.dtype} {list(array.shape)}"
        raise ImageDecodeError(f"16-bit samples of a {width}x{height} image could not be decoded (OpenCV gave {got})")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.shape[2] == 2:  # grey + alpha
        array = np.repeat(array[:, :, :1], 3, axis=2)
    else:  # BGR or BGRA
        array = array[:, :, 2::-1]
    return _round_levels(array.astype(np.float64) / 257.0)


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
