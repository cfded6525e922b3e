"""Perturbation budgets and the image-quality measures that report them.

All functions are pure and work on canonical batches (float32 [B, 3, H, W] in [0, 1]); per-image values
come back as a [B] tensor. SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5,
C1 = (0.01)^2, C2 = (0.03)^2 on [0, 1] data, computed per channel and averaged; DSSIM = (1 - SSIM) / 2,
the quantity Fawkes bounds.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cloakbench.config import require


class BudgetKind(enum.Enum):
    LINF = "linf"


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A hard budget the base :class:`~cloakbench.defenses.base.Defense` enforces on every output."""

    kind: BudgetKind
    value: float

    def __post_init__(self) -> None:
        require(0.0 < self.value <= 1.0, f"budget value must be in (0, 1], got {self.value}")

    def project(self, original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        if self.kind is BudgetKind.LINF:
            projected: torch.Tensor = original + (perturbed - original).clamp(-self.value, self.value)
            return projected
        raise NotImplementedError(self.kind)

    def measure(self, original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        if self.kind is BudgetKind.LINF:
            return linf(original, perturbed)
        raise NotImplementedError(self.kind)

    def describe(self) -> str:
        return f"{self.kind.value} <= {self.value:.6g} ({self.value * 255:.3g}/255)"


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
    """Mean structural similarity per image (differentiable; valid-region windows)."""
    channels = original.shape[1]
    w = _gaussian_window(window, sigma, channels, original)
    c1, c2 = 0.01**2, 0.03**2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=channels)

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
