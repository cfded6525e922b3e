"""Differentiable twins of the real input transforms, for optimisation loops only.

A robust cloak is optimised by expectation over transforms: the loss is taken through the tracker's
countermeasure, so the countermeasure must pass gradients. The real codecs and filters work on 8-bit images
and do not; each twin here is a torch re-implementation of one of them that does. Twins are for the
optimiser only; every reported number comes from the real transform (:meth:`InputTransform.apply`).
:meth:`InputTransform.twin` returns the twin with the same parameters, or None where there is none.

What every twin leaves out: the real transforms round their input and output to 8 bits (a tracker works on
saved images). The twins skip both roundings: each moves a pixel by at most half a level (1/510), and the
gradient of a rounding is zero almost everywhere, so keeping them would only block the optimiser.

How close each twin is to its real transform is measured on celeb24 by ``scripts/twin_gap.py``
(``benchmarks/results/twin_gap_cpu.md``) and asserted in ``tests/test_transforms.py``.

This module depends on nothing else in the transforms package (the real transforms import their twins from
here), so the shared helpers the real and twin versions must agree on (:func:`downscaled_size`,
:func:`jpeg_quant_tables`) live here.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Hashable
from typing import Literal, final

import torch
import torch.nn.functional as F

from cloakbench.config import require
from cloakbench.errors import ImageContractError

Subsampling = Literal["4:4:4", "4:2:2", "4:2:0"]

# The example tables of the JPEG standard (ITU-T T.81, Annex K.1), natural (row-major) order. libjpeg scales
# them by quality (jpeg_set_quality) and Pillow writes the scaled tables into every file it saves; the test
# suite checks them against the tables Pillow reports for a file it encoded.
_LUMA_BASE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_BASE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8 for _ in range(4)),
)

# Chroma subsampling factors (vertical, horizontal) per JPEG sampling mode.
_CHROMA_FACTORS: dict[str, tuple[int, int]] = {"4:4:4": (1, 1), "4:2:2": (1, 2), "4:2:0": (2, 2)}


class DifferentiableTwin(abc.ABC):
    """A differentiable stand-in for a real input transform, used only inside optimisation loops.

    ``twin(images, generator=...)`` takes and returns a batch of the canonical shape ``[B, 3, H, W]``, RGB,
    in [0, 1] (float32; float64 also works, for numerical gradient checks), and passes gradients to
    ``images``. ``generator`` feeds stochastic twins; the deterministic ones ignore it. The call checks the
    shapes only: checking the value range would cost a device synchronisation in every optimisation step.
    """

    name: str

    @abc.abstractmethod
    def _forward(self, images: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor: ...

    @final
    def __call__(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        if not images.is_floating_point() or images.ndim != 4 or images.shape[1] != 3:
            raise ImageContractError(
                f"{self.name} twin: expected a floating-point [B, 3, H, W] batch, got {images.dtype} "
                f"{list(images.shape)}"
            )
        out = self._forward(images, generator=generator)
        if out.shape != images.shape:
            raise ImageContractError(
                f"{self.name} twin: returned shape {list(out.shape)}, expected {list(images.shape)}"
            )
        return out

    def _constant(
        self, key: Hashable, make: Callable[[], torch.Tensor], like: torch.Tensor, *, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``make()`` moved to ``like``'s device and dtype (or ``dtype``) once per (key, device, dtype), then reused:
        no host-to-device copy per call inside an optimisation loop."""
        memo: dict[tuple[Hashable, torch.device, torch.dtype], torch.Tensor]
        memo = self.__dict__.setdefault("_constants", {})
        slot = (key, like.device, dtype or like.dtype)
        if slot not in memo:
            with torch.inference_mode(False):  # a tensor made in inference mode could not join a later backward pass
                memo[slot] = make().to(device=like.device, dtype=dtype or like.dtype)
        return memo[slot]

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "name")
        return f"{type(self).__name__}({params})"


# --------------------------------------------------------------------------------------------------- JPEG


def jpeg_quant_tables(quality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The luminance and chrominance quantisation tables libjpeg writes for ``quality`` (float64 [8, 8]).

    As ``jpeg_set_quality(quality, force_baseline=TRUE)``: scale = 5000 / q (integer division) below 50,
    200 - 2q from 50 on; entry = floor((base * scale + 50) / 100) clipped to [1, 255].
    """
    require(1 <= quality <= 100, f"quality must be in 1..100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality

    def scaled(base: tuple[tuple[int, ...], ...]) -> torch.Tensor:
        table = [[min(max((b * scale + 50) // 100, 1), 255) for b in row] for row in base]
        return torch.tensor(table, dtype=torch.float64)

    return scaled(_LUMA_BASE), scaled(_CHROMA_BASE)


def dct_matrix(n: int = 8) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (float64 [n, n]): coefficients of a block X are ``D @ X @ D.T``.

    For 8x8 blocks this is exactly the forward DCT of the JPEG standard, F(u, v) = C(u) C(v) / 4 * sum ...
    with C(0) = 1/sqrt(2), the transform the quantisation tables are defined for.
    """
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


def soft_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) + (x - round(x))^3: equal to rounding within 1/8 everywhere, with a gradient 3 (x - round(x))^2.

    The cubic approximation of Shin & Song, "JPEG-resistant adversarial images" (NeurIPS 2017 MLSec
    workshop). Its gradient is zero only on the integers, so the optimiser still sees which way a
    coefficient would have to move to change its quantised value.
    """
    r = torch.round(x)
    return r + (x - r) ** 3


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """RGB -> YCbCr, both on the 0..255 scale, full range (JFIF, as libjpeg converts)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168735892 * r - 0.331264108 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418687589 * g - 0.081312411 * b + 128.0
    return torch.stack((y, cb, cr), dim=1)


def ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """YCbCr -> RGB, both on the 0..255 scale, full range (JFIF, as libjpeg converts); not clamped."""
    y, cb, cr = x[:, 0], x[:, 1] - 128.0, x[:, 2] - 128.0
    r = y + 1.402 * cr
    g = y - 0.344136286 * cb - 0.714136286 * cr
    b = y + 1.772 * cb
    return torch.stack((r, g, b), dim=1)


class JPEGTwin(DifferentiableTwin):
    """A differentiable JPEG encode + decode (baseline, libjpeg's standard tables scaled by quality).

    The pipeline follows libjpeg: RGB -> YCbCr (JFIF); the image padded to whole MCUs by replicating its last
    row and column (libjpeg pads the same way; the padding is cropped off at the end); chroma subsampled by
    averaging 2x2 (4:2:0) or 1x2 (4:2:2) blocks; level shift by 128; orthonormal 8x8 DCT-II as a matrix
    product; quantisation by the scaled tables with :func:`soft_round` in place of rounding; dequantisation,
    inverse DCT, chroma upsampled bilinearly (at half-pixel centres, edges replicated: this is libjpeg's
    default "fancy" triangular upsampling); YCbCr -> RGB; clamped to [0, 1].

    Left out: the 8-bit rounding of the input and output and of libjpeg's integer colour conversion and
    integer DCT, and entropy coding (lossless).
    """

    name = "jpeg"

    def __init__(self, *, quality: int, subsampling: Subsampling = "4:2:0") -> None:
        require(subsampling in _CHROMA_FACTORS, f"subsampling must be one of {sorted(_CHROMA_FACTORS)}")
        self.quality = quality
        self.subsampling: Subsampling = subsampling
        self._luma, self._chroma = jpeg_quant_tables(quality)
        self._dct = dct_matrix(8)

    def _forward(self, images: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        _, _, h, w = images.shape
        fy, fx = _CHROMA_FACTORS[self.subsampling]
        ycc = rgb_to_ycbcr(images * 255.0)
        pad_h, pad_w = (-h) % (8 * fy), (-w) % (8 * fx)
        if pad_h or pad_w:
            ycc = F.pad(ycc, (0, pad_w, 0, pad_h), mode="replicate")
        dct = self._constant("dct", lambda: self._dct, images)
        luma = self._code(ycc[:, :1], dct, self._constant("luma", lambda: self._luma, images))
        chroma = ycc[:, 1:]
        if fy > 1 or fx > 1:
            chroma = F.avg_pool2d(chroma, (fy, fx))
        chroma = self._code(chroma, dct, self._constant("chroma", lambda: self._chroma, images))
        if fy > 1 or fx > 1:
            chroma = F.interpolate(chroma, size=luma.shape[-2:], mode="bilinear", align_corners=False)
        rgb = ycbcr_to_rgb(torch.cat((luma, chroma), dim=1))[:, :, :h, :w]
        return (rgb / 255.0).clamp(0.0, 1.0)

    @staticmethod
    def _code(plane: torch.Tensor, dct: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Level-shift, DCT, soft-quantise, dequantise and invert the 8x8 blocks of planes with sides multiple of 8."""
        b, c, h, w = plane.shape
        blocks = (plane - 128.0).reshape(b, c, h // 8, 8, w // 8, 8).transpose(3, 4)
        coeffs = dct @ blocks @ dct.T
        coeffs = soft_round(coeffs / table) * table
        blocks = dct.T @ coeffs @ dct
        return blocks.transpose(3, 4).reshape(b, c, h, w) + 128.0


# --------------------------------------------------------------------------------------------------- blur


def gaussian_kernel_size(sigma: float) -> int:
    """The default kernel size for ``sigma``: 2 * ceil(3 sigma) + 1, wide enough for +-3 sigma (99.7 %)."""
    return 2 * math.ceil(3.0 * sigma) + 1


def reflect101_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices into a length-``n`` axis padded by ``pad`` on both sides with OpenCV's BORDER_REFLECT_101.

    (``gfedcb|abcdefgh|gfedcba``, the edge pixel not repeated; torch's ``mode='reflect'``). Written as an index
    so that it also holds where ``pad >= n``, where torch's reflect padding refuses and OpenCV keeps
    reflecting.
    """
    i = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.abs() % period
    return torch.where(i >= n, period - i, i)


class GaussianBlurTwin(DifferentiableTwin):
    """Separable Gaussian convolution with OpenCV's kernel (sampled exp(-x^2 / 2 sigma^2), normalised to sum 1)
    and its default border (BORDER_REFLECT_101), in floating point where OpenCV uses fixed point on 8 bits."""

    name = "blur"

    def __init__(self, *, sigma: float, kernel: int | None = None) -> None:
        require(math.isfinite(sigma) and sigma > 0, f"sigma must be a positive number, got {sigma}")
        size = gaussian_kernel_size(sigma) if kernel is None else kernel
        require(size >= 1 and size % 2 == 1, f"kernel must be an odd size >= 1, got {size}")
        self.sigma = sigma
        self.kernel = size

    def weights(self, like: torch.Tensor) -> torch.Tensor:
        def make() -> torch.Tensor:
            coords = torch.arange(self.kernel, dtype=torch.float64) - (self.kernel - 1) / 2
            g = torch.exp(-(coords**2) / (2.0 * self.sigma**2))
            return g / g.sum()

        return self._constant("weights", make, like)

    def _forward(self, images: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        _, c, h, w = images.shape
        g = self.weights(images)
        pad = self.kernel // 2
        cpu = torch.device("cpu")
        cols = self._constant(("cols", w), lambda: reflect101_index(w, pad, cpu), images, dtype=torch.long)
        rows = self._constant(("rows", h), lambda: reflect101_index(h, pad, cpu), images, dtype=torch.long)
        x = images.index_select(3, cols)
        x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, self.kernel), groups=c)
        x = x.index_select(2, rows)
        return F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, self.kernel, 1), groups=c)


# ------------------------------------------------------------------------------------------------- resize


def downscaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """The intermediate size of a down-then-up resize: each side times ``factor``, rounded half up, >= 1 px."""
    return max(1, math.floor(height * factor + 0.5)), max(1, math.floor(width * factor + 0.5))


def area_matrix(size: int, small: int) -> torch.Tensor:
    """The ``[small, size]`` matrix of OpenCV's INTER_AREA shrink along one axis (float64).

    Small pixel j averages the source interval [j s, (j + 1) s), s = size / small, each source pixel weighted
    by its overlap with the interval (partial pixels at the ends count by their covered fraction).
    """
    s = size / small
    j = torch.arange(small, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    overlap = torch.minimum((j + 1) * s, i + 1) - torch.maximum(j * s, i)
    return overlap.clamp_min(0.0) / s


class ResizeTwin(DifferentiableTwin):
    """Down with OpenCV's INTER_AREA as a matrix product, back up bilinearly (half-pixel centres), to the real
    transform's sizes.

    The shrink is :func:`area_matrix` applied to rows and columns, not ``F.interpolate(mode='area')``: that is
    adaptive average pooling, equal to INTER_AREA only when the side is a whole multiple of the small side
    (112 -> 56); at other ratios (112 -> 84 at factor 0.75) INTER_AREA weights the pixels cut by a cell
    boundary by their covered fraction, pooling by whole pixels, and the pooling twin measured 38.7 dB PSNR
    from the real transform on celeb24 where the matrix one stays at the 8-bit rounding floor. (On float
    images, both matrices match ``cv2.resize`` to 1e-6.) Bilinear with ``align_corners=False`` is OpenCV's
    INTER_LINEAR, in floating point where OpenCV uses fixed point on 8 bits.
    """

    name = "resize"

    def __init__(self, *, factor: float) -> None:
        require(math.isfinite(factor) and 0 < factor <= 1, f"factor must be in (0, 1], got {factor}")
        self.factor = factor

    def _forward(self, images: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        h, w = images.shape[-2:]
        small_h, small_w = downscaled_size(h, w, self.factor)
        if (small_h, small_w) == (h, w):
            return images.clone()  # cv2.resize to the same size copies; so does the real transform
        rows = self._constant(("rows", h, small_h), lambda: area_matrix(h, small_h), images)
        cols = self._constant(("cols", w, small_w), lambda: area_matrix(w, small_w), images)
        small = rows @ images @ cols.T
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------- grayscale

BT601_LUMA = (0.299, 0.587, 0.114)
"""The ITU-R BT.601 luma weights of R, G and B: Pillow's ``convert("L")``, OpenCV's ``COLOR_RGB2GRAY`` and the Y of
JPEG's YCbCr (:func:`rgb_to_ycbcr`) all use them."""


class GrayscaleTwin(DifferentiableTwin):
    """``Y = 0.299 R + 0.587 G + 0.114 B`` copied to the three channels: the real transform's linear map without its
    8-bit roundings, so exactly differentiable (its Jacobian is the map itself)."""

    name = "grayscale"

    def _forward(self, images: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        weights = self._constant("luma", lambda: torch.tensor(BT601_LUMA, dtype=torch.float64).view(1, 3, 1, 1), images)
        luma = (images * weights).sum(dim=1, keepdim=True)
        return luma.expand_as(images).contiguous()


# ------------------------------------------------------------------------------------------------ realign


def draw_similarities(
    count: int, generator: torch.Generator, *, rotation: float, scale: float, shift: float
) -> torch.Tensor:
    """``count`` random similarity transforms as rows (angle in degrees, scale factor, x shift, y shift as fractions
    of the side), float64 on the CPU, each uniform within its bound: angle in [-rotation, rotation], scale in
    [1 - scale, 1 + scale], shifts in [-shift, shift].

    One ``torch.rand`` of ``[count, 4]`` from ``generator`` (on the generator's device): the real ``realign``
    transform and its twin draw the same transforms from generators in the same state.
    """
    u = torch.rand((count, 4), generator=generator, device=generator.device, dtype=torch.float64).cpu()
    centred = 2.0 * u - 1.0
    bounds = torch.tensor([rotation, scale, shift, shift], dtype=torch.float64)
    draws = centred * bounds
    draws[:, 1] += 1.0
    return draws


def similarity_matrices(draws: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The ``[N, 2, 3]`` forward matrices (source pixel -> destination pixel, OpenCV's ``warpAffine`` convention,
    pixel centres at integers, float64) of :func:`draw_similarities` rows for an image of ``height`` x ``width``.

    Each rotates by the angle (counter-clockwise as seen on screen for a positive angle, OpenCV's
    ``getRotationMatrix2D`` convention) and scales about the image centre ``((W - 1) / 2, (H - 1) / 2)``, then
    shifts by ``(dx W, dy H)`` pixels.
    """
    angle = torch.deg2rad(draws[:, 0])
    s = draws[:, 1]
    a, b = s * torch.cos(angle), s * torch.sin(angle)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    tx = cx - a * cx - b * cy + draws[:, 2] * width
    ty = cy + b * cx - a * cy + draws[:, 3] * height
    row0 = torch.stack((a, b, tx), dim=1)
    row1 = torch.stack((-b, a, ty), dim=1)
    return torch.stack((row0, row1), dim=1)


def sampling_grid_theta(forward: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``theta`` for ``F.affine_grid(..., align_corners=False)`` that makes ``F.grid_sample`` warp as
    ``cv2.warpAffine(image, forward)`` does: each output pixel reads the input at ``forward^-1`` of its centre.

    Normalised coordinates (``align_corners=False``) put pixel ``x`` at ``(2 x + 1) / W - 1``; theta is
    normalise . forward^-1 . denormalise, in float64.
    """
    n = forward.shape[0]
    full = torch.zeros((n, 3, 3), dtype=torch.float64)
    full[:, :2] = forward.to(torch.float64)
    full[:, 2, 2] = 1.0
    inverse = torch.linalg.inv(full)
    to_pixels = torch.tensor(
        [[width / 2.0, 0.0, (width - 1) / 2.0], [0.0, height / 2.0, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    to_normalised = torch.linalg.inv(to_pixels)
    theta: torch.Tensor = (to_normalised @ inverse @ to_pixels)[:, :2]
    return theta


def check_jitter_bounds(*, rotation: float, scale: float, shift: float) -> None:
    """The bounds ``realign``'s jitter accepts: rotation in [0, 180] degrees, scale and shift in [0, 1)."""
    require(math.isfinite(rotation) and 0 <= rotation <= 180, f"rotation must be in [0, 180] degrees, got {rotation}")
    require(math.isfinite(scale) and 0 <= scale < 1, f"scale must be in [0, 1), got {scale}")
    require(math.isfinite(shift) and 0 <= shift < 1, f"shift must be in [0, 1) (a fraction of the side), got {shift}")


class RealignJitterTwin(DifferentiableTwin):
    """The ``realign`` transform's jitter mode in torch: the same random similarity per image (drawn by
    :func:`draw_similarities` from the generator passed in), warped with ``F.affine_grid`` and bilinear
    ``F.grid_sample`` with zeros outside the image (OpenCV's ``INTER_LINEAR`` with a constant black border).

    Differentiable in the image (bilinear sampling is linear in it); the geometry is drawn, not optimised. A
    generator is required: a stochastic twin without one would have to draw from the global RNG.
    Left out: the 8-bit roundings, and OpenCV's fixed-point coordinates (1/32 px) and interpolation weights.
    """

    name = "realign"

    def __init__(self, *, rotation: float, scale: float, shift: float) -> None:
        check_jitter_bounds(rotation=rotation, scale=scale, shift=shift)
        self.rotation = rotation
        self.scale = scale
        self.shift = shift

    def _forward(self, images: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            raise ValueError("realign twin: draws a random transform per image; pass generator=")
        if self.rotation == 0 and self.scale == 0 and self.shift == 0:
            return images.clone()
        b, _, h, w = images.shape
        draws = draw_similarities(b, generator, rotation=self.rotation, scale=self.scale, shift=self.shift)
        theta = sampling_grid_theta(similarity_matrices(draws, h, w), h, w).to(images)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
