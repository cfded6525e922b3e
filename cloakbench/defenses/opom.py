"""OPOM, One Person One Mask (Zhong & Deng, TPAMI 2022): one universal mask per person.

A single perturbation delta (L-inf eps 8/255) is optimised on all of one identity's photos so that every
masked photo's features move away from that identity's feature subspace, then added to each photo
(add and clip). The subspace is the class centre, or the affine hull of the clean features (the
paper's better-performing variant): the distance of a feature v to the hull {mu + A c} is the norm of
the component of (v - mu) orthogonal to the span of the centred features A, computed exactly from an
SVD. From a random start in the ball, iterative signed-gradient steps (I-FGSM, step 1/255, 50 steps)
with momentum 0.9 as in MI-FGSM; the surrogates are the zoo's white-box models. The masked photos are
the ones the user shares, so the threat model is evasion (they sit in a gallery; clean probes search it).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.config import build, require, to_plain
from cloakbench.defenses.base import Defense, DefenseRequirements, ThreatModel
from cloakbench.defenses.budgets import Budget
from cloakbench.defenses.objectives import batches, embed_all


class Subspace(enum.Enum):
    CENTER = "center"
    AFFINE = "affine"


@dataclass(frozen=True, kw_only=True)
class OPOMConfig:
    epsilon: float = 8 / 255
    steps: int = 50
    step_size: float = 1 / 255
    momentum: float = 0.9
    subspace: Subspace = Subspace.AFFINE
    batch_size: int | None = None  # photos per forward pass; the mask's gradient sums over all of them

    def __post_init__(self) -> None:
        require(0 < self.epsilon <= 1, f"epsilon must be in (0, 1], got {self.epsilon}")
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(0 < self.step_size <= 1, f"step_size must be in (0, 1], got {self.step_size}")
        require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        require(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


def subspace_distance(v: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Per row of ``v``: distance to the affine set ``mean + span(basis rows)`` (the centre when None)."""
    r = v - mean
    if basis is not None and basis.shape[0] > 0:
        r = r - (r @ basis.T) @ basis
    return (r.pow(2).sum(dim=1) + 1e-12).sqrt()


def hull(feats: torch.Tensor, kind: Subspace) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Centre and (for the affine hull) an orthonormal basis of the centred features' span."""
    mean = feats.mean(dim=0)
    if kind is Subspace.CENTER or feats.shape[0] < 2:
        return mean, None
    _, s, vh = torch.linalg.svd(feats - mean, full_matrices=False)
    rank = int((s > s.max() * 1e-6).sum())
    return mean, vh[:rank]


class OPOM(Defense):
    threat_model = ThreatModel.EVASION
    requirements = DefenseRequirements(differentiable_surrogates=True, min_surrogates=1)

    def __init__(self, config: OPOMConfig, *, surrogates: Sequence[Recognizer], name: str = "opom") -> None:
        super().__init__(name=name, budget=Budget(linf=config.epsilon), surrogates=surrogates)
        self.config = config
        self.masks: dict[str, torch.Tensor] = {}  # the last mask made per identity

    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        out = torch.empty_like(images)
        for ident in dict.fromkeys(identities):
            idx = torch.tensor([i for i, x in enumerate(identities) if x == ident])
            mask = self.mask_for(images[idx], generator=generator)
            self.masks[ident] = mask
            out[idx] = (images[idx] + mask).clamp(0, 1)
        return out

    def mask_for(self, photos: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """The universal mask [1, 3, H, W] of one person, from their photos."""
        cfg = self.config
        device = self.surrogates[0].device
        x = photos.to(device)
        batch_size = cfg.batch_size or self.surrogates[0].preferred_batch_size
        subspaces = []
        for s in self.surrogates:
            feats = torch.cat([embed_all([s], x[sl], grad=False)[0] for sl in batches(x.shape[0], batch_size)])
            subspaces.append(hull(feats, cfg.subspace))
        # a random start: every clean feature lies on its own hull, where the distance has no gradient
        delta = ((2 * torch.rand((1, *x.shape[1:]), generator=generator) - 1) * cfg.epsilon).to(device)
        velocity = torch.zeros_like(delta)
        for _ in range(cfg.steps):
            grad = torch.zeros_like(delta)
            for sl in batches(x.shape[0], batch_size):
                d = delta.clone().requires_grad_(True)
                adv = (x[sl] + d).clamp(0, 1)
                loss = sum(
                    subspace_distance(f, mean, basis).sum()
                    for f, (mean, basis) in zip(embed_all(self.surrogates, adv, grad=True), subspaces, strict=True)
                )
                (g,) = torch.autograd.grad(loss, d)  # type: ignore[arg-type]
                grad += g
            velocity = cfg.momentum * velocity + grad / grad.abs().mean().clamp_min(1e-12)
            delta = (delta + cfg.step_size * velocity.sign()).clamp(-cfg.epsilon, cfg.epsilon)
        return delta.cpu()

    def config_dict(self) -> dict[str, object]:
        return {**super().config_dict(), "config": to_plain(self.config)}


def make_opom(*, surrogates: Sequence[Recognizer], name: str = "opom", **config: Any) -> OPOM:
    return OPOM(build(OPOMConfig, config, where=f"defense {name!r}"), surrogates=surrogates, name=name)
