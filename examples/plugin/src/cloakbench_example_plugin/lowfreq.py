"""A low-frequency colour-shift cloak under an L-inf budget.

The perturbation is smooth by construction: a coarse ``grid x grid`` lattice of per-channel offsets, bilinearly
interpolated to the photo's size, so the cloak is a slowly varying colour shift rather than per-pixel noise.
The lattice is optimised by signed gradient ascent on the surrogates' cosine embedding distance between the
cloaked and the clean photo (as cloakbench's ``pgd`` does per pixel) and projected onto ``[-epsilon, epsilon]``
after every step. Bilinear interpolation with ``align_corners=True`` is a convex combination of lattice values,
so every pixel's offset stays within the lattice's bound: the cloak meets its L-inf budget before the base class
enforces it (which it does anyway, after rounding to 8 bits).

Why low frequencies: Guo, Frank and Weinberger (Low Frequency Adversarial Perturbation, UAI 2019) restrict
adversarial perturbations to the low-frequency DCT coefficients; such perturbations are little changed by
blurring, downsampling and JPEG compression, which discard high frequencies first, and a tracker's input
countermeasures are exactly those. This cloak uses a bilinear lattice instead of a DCT basis (same idea, simpler
to bound in L-inf).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cloakbench.api import (
    Budget,
    Defense,
    DefenseRequirements,
    Recognizer,
    ThreatModel,
    build_config,
    require,
)


@dataclass(frozen=True, kw_only=True)
class LowFrequencyConfig:
    epsilon: float = 8 / 255  # L-inf budget of every pixel's change
    grid: int = 16  # lattice points per side (2: one gradient over the face; 112: per pixel, i.e. plain PGD)
    steps: int = 20
    step_size: float = 2 / 255  # signed-gradient step of the lattice values
    random_start: bool = True  # start from uniform lattice values in [-epsilon, epsilon] (from the generator)
    batch_size: int = 8

    def __post_init__(self) -> None:
        require(0 < self.epsilon <= 1, f"epsilon must be in (0, 1], got {self.epsilon}")
        require(2 <= self.grid <= 512, f"grid must be in 2..512, got {self.grid}")
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(0 < self.step_size <= 1, f"step_size must be in (0, 1], got {self.step_size}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


def smooth_offsets(lattice: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per-pixel offsets [B, 3, H, W] from a lattice [B, 3, g, g] (bilinear, corners aligned: a convex
    combination of lattice values, so ``|offset| <= max |lattice|``)."""
    return F.interpolate(lattice, size=size, mode="bilinear", align_corners=True)


class LowFrequencyCloak(Defense):
    threat_model = ThreatModel.POISONING
    requirements = DefenseRequirements(differentiable_surrogates=True, min_surrogates=1)

    def __init__(self, config: LowFrequencyConfig, *, surrogates: Sequence[Recognizer], name: str = "lowfreq") -> None:
        super().__init__(name=name, budget=Budget(linf=config.epsilon), surrogates=surrogates)
        self.config = config

    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        device = self.surrogates[0].device
        outs = []
        for start in range(0, images.shape[0], cfg.batch_size):
            x = images[start : start + cfg.batch_size].to(device)
            shape = (x.shape[0], 3, cfg.grid, cfg.grid)
            if cfg.random_start:  # drawn on the CPU from the injected generator: the same cloak on every device
                lattice = (2 * torch.rand(shape, generator=generator) - 1) * cfg.epsilon
            else:
                lattice = torch.zeros(shape)
            outs.append(self._attack(x, lattice.to(device)).cpu())
        return torch.cat(outs)

    def _attack(self, x: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        size = (x.shape[-2], x.shape[-1])
        with torch.no_grad():
            clean = [s.embed(x) for s in self.surrogates]
        for _ in range(cfg.steps):
            lattice = lattice.detach().requires_grad_(True)
            cloaked = (x + smooth_offsets(lattice, size)).clamp(0, 1)
            distance = torch.stack(
                [
                    1.0 - (s.embed(cloaked, grad=True) * c).sum(dim=1)
                    for s, c in zip(self.surrogates, clean, strict=True)
                ]
            ).mean(dim=0)
            (grad,) = torch.autograd.grad(distance.sum(), lattice)
            lattice = (lattice + cfg.step_size * grad.sign()).clamp(-cfg.epsilon, cfg.epsilon)
        with torch.no_grad():
            return (x + smooth_offsets(lattice.detach(), size)).clamp(0, 1)

    def config_dict(self) -> dict[str, object]:
        return {**super().config_dict(), "config": dataclasses.asdict(self.config)}


def make_lowfreq(*, surrogates: Sequence[Recognizer], name: str = "lowfreq", **config: Any) -> LowFrequencyCloak:
    """The registry factory: parameters are validated into :class:`LowFrequencyConfig` (errors name the defense)."""
    return LowFrequencyCloak(
        build_config(LowFrequencyConfig, config, where=f"defense {name!r}"), surrogates=surrogates, name=name
    )
