"""Perturbation budgets and the image-quality measures that report them.

All functions are pure and work on canonical batches (float32 [B, 3, H, W] in [0, 1]); per-image values
come back as a [B] tensor. SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5,
C1 = (0.01)^2, C2 = (0.03)^2 on [0, 1] data, computed per channel and averaged; DSSIM = (1 - SSIM) / 2,
the quantity Fawkes bounds.

One deliberate difference from TensorFlow's ``ssim`` (which Fawkes calls) and most SSIM code: the
windows are centred on *every* pixel, the image reflected at its edges, instead of only where a whole
window fits. With valid windows the outer pixels carry almost no weight (a pixel on the edge enters
only windows centred 5 pixels away, at 0.004 of the centre's weight), so a DSSIM bound leaves a 5-pixel frame
(17 % of a 112x112 face) nearly free: measured on celeb24, Fawkes paper high at DSSIM 0.008 changed edge
pixels by up to 189/255, a frame of speckles in the amplified difference. Centred windows measure every
pixel like any other. Measured on 8 celeb24 faces: inverting the outer 2 rows costs DSSIM 0.001-0.003
with valid windows and 0.019-0.024 centred; uniform 8/255 noise everywhere 0.029-0.046 valid and
0.033-0.048 centred.

A :class:`Budget` is enforced *after* quantisation: the L-inf ball is a projection, and a DSSIM bound is
met by shrinking each image's perturbation (a per-image bisection on the scale of the quantised
perturbation), so the saved PNG itself is within budget, not just the float image before rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cloakbench.config import require
from cloakbench.images import quantize

QUANTISATION_SLACK = 0.5 / 255 + 1e-6
"""How far rounding to uint8 may move a pixel; L-inf budgets are checked with this tolerance."""

DSSIM_SLACK = 1e-6
"""Float tolerance of the DSSIM check (the bisection itself works on quantised images)."""

_BISECTION_STEPS = 12


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A hard budget the base :class:`~cloakbench.defenses.base.Defense` enforces on every output.

    ``linf``: the largest change of any pixel value (on [0, 1]); ``dssim``: the largest structural
    dissimilarity (1 - SSIM) / 2 of an image. Either or both may be set (Fawkes v1.0 sets both).
    """

    linf: float | None = None
    dssim: float | None = None

    def __post_init__(self) -> None:
        require(self.linf is not None or self.dssim is not None, "a budget needs 'linf', 'dssim' or both")
        require(self.linf is None or 0.0 < self.linf <= 1.0, f"linf budget must be in (0, 1], got {self.linf}")
        require(self.dssim is None or 0.0 < self.dssim <= 0.5, f"dssim budget must be in (0, 0.5], got {self.dssim}")

    def enforce(self, original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """Project into the budget, clip to [0, 1] and quantise to the uint8 grid (with rounding)."""
        delta = perturbed - original
        if self.linf is not None:
            delta = delta.clamp(-self.linf, self.linf)
        out = quantize((original + delta).clamp(0.0, 1.0))
        if self.dssim is None:
            return out
        over = dssim(original, out) > self.dssim
        if not bool(over.any()):
            return out
        idx = over.nonzero().flatten()
        out[idx] = _shrink_to_dssim(original[idx], delta[idx], self.dssim)
        return out

    def violations(self, original: torch.Tensor, out: torch.Tensor) -> list[str]:
        """What, if anything, exceeds the budget (empty when every image is within it)."""
        problems = []
        if self.linf is not None:
            worst = float(linf(original, out).max())
            if worst > self.linf + QUANTISATION_SLACK:
                problems.append(f"L-inf {worst:.6g} > {self.linf:.6g}")
        if self.dssim is not None:
            # the floor: what rounding the original alone costs (zero for photos read from uint8 files)
            floor = dssim(original, quantize(original))
            worst_excess = float((dssim(original, out) - floor).max())
            if worst_excess > self.dssim + DSSIM_SLACK:
                problems.append(f"DSSIM {worst_excess:.6g} > {self.dssim:.6g}")
        return problems

    def describe(self) -> str:
        parts = []
        if self.linf is not None:
            parts.append(f"linf <= {self.linf:.6g} ({self.linf * 255:.3g}/255)")
        if self.dssim is not None:
            parts.append(f"dssim <= {self.dssim:.6g}")
        return ", ".join(parts)


def _shrink_to_dssim(original: torch.Tensor, delta: torch.Tensor, bound: float) -> torch.Tensor:
    """The largest quantised ``original + s * delta`` (s in [0, 1], per image) with DSSIM <= bound."""
    lo = torch.zeros(original.shape[0], device=original.device)
    hi = torch.ones_like(lo)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        cand = quantize((original + mid.view(-1, 1, 1, 1) * delta).clamp(0.0, 1.0))
        ok = dssim(original, cand) <= bound
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return quantize((original + lo.view(-1, 1, 1, 1) * delta).clamp(0.0, 1.0))


def linf(original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    return (perturbed - original).abs().flatten(1).amax(dim=1)


def l2(original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    diff = (perturbed - original).flatten(1)
    return diff.pow(2).sum(dim=1).sqrt()


def psnr(original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB (peak 1.0); +inf for identical images."""
    mse = (perturbed - original).pow(2).flatten(1).mean(dim=1)
    return torch.where(mse > 0, 10.0 * torch.log10(1.0 / mse.clamp_min(1e-20)), torch.full_like(mse, math.inf))


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = g[:, None] * g[None, :]
    return window.expand(channels, 1, size, size).contiguous()


def ssim(original: torch.Tensor, perturbed: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean structural similarity per image (differentiable; a window centred on every pixel, the image
    reflected at its edges: see the module's docstring)."""
    channels = original.shape[1]
    w = _gaussian_window(window, sigma, channels, original)
    c1, c2 = 0.01**2, 0.03**2
    pad = window // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), w, groups=channels)

    mu_x, mu_y = blur(original), blur(perturbed)
    sxx = blur(original * original) - mu_x**2
    syy = blur(perturbed * perturbed) - mu_y**2
    sxy = blur(original * perturbed) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(dim=1)


def dssim(original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    return (1.0 - ssim(original, perturbed)) / 2.0


def quality_report(original: torch.Tensor, perturbed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image L-inf, L2, PSNR, SSIM and DSSIM of ``perturbed`` against ``original``."""
    with torch.no_grad():
        s = ssim(original, perturbed)
        return {
            "linf": linf(original, perturbed),
            "l2": l2(original, perturbed),
            "psnr": psnr(original, perturbed),
            "ssim": s,
            "dssim": (1.0 - s) / 2.0,
        }


def ssim_tf(original: torch.Tensor, perturbed: torch.Tensor, *, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM per image as TensorFlow's ``tf.image.ssim`` computes it (differentiable).

    The same Gaussian window, constants and channel average as :func:`ssim`, but only *valid* windows
    (no padding: a 112x112 image gives a 102x102 map), as TensorFlow's depthwise convolution with
    ``padding='VALID'``; the local variances are ``E[x^2 + y^2] - mu_x^2 - mu_y^2`` as TensorFlow writes
    them. Scale-free: TensorFlow on 0..255 with ``max_val=255`` is this on [0, 1] (``max_val`` 1). This is
    the measure Fawkes' code bounds; :func:`ssim` (centred windows) is cloakbench's.
    """
    channels = original.shape[1]
    w = _gaussian_window(window, sigma, channels, original)
    c1, c2 = 0.01**2, 0.03**2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=channels)

    mu_x, mu_y = blur(original), blur(perturbed)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    cs = (2 * blur(original * perturbed) - 2 * mu_x * mu_y + c2) / (
        blur(original * original + perturbed * perturbed) - mu_x**2 - mu_y**2 + c2
    )
    return (luminance * cs).flatten(1).mean(dim=1)


def dssim_tf(original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """(1 - SSIM) / 2 with TensorFlow's valid-window SSIM (:func:`ssim_tf`), as Fawkes computes its DSSIM."""
    return (1.0 - ssim_tf(original, perturbed)) / 2.0
