"""PGD: L-inf projected gradient ascent on the embedding distance (baseline cloak).

Untargeted: maximise the mean over surrogates of the cosine distance ``1 - cos(f(x'), f(x))`` between the
cloaked and the clean embedding, with signed-gradient steps of ``step_size`` projected back into the
``epsilon`` ball and [0, 1] (Madry et al., ICLR 2018, applied to face embeddings). A random start inside
the ball is drawn from the injected generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.config import build, require, to_plain
from cloakbench.defenses.base import Defense, DefenseRequirements, ThreatModel
from cloakbench.defenses.budgets import Budget
from cloakbench.defenses.objectives import signed_gradient_ascent


@dataclass(frozen=True, kw_only=True)
class PGDConfig:
    epsilon: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    batch_size: int | None = None  # None: the first surrogate's preferred batch size (small on CPU)

    def __post_init__(self) -> None:
        require(0 < self.epsilon <= 1, f"epsilon must be in (0, 1], got {self.epsilon}")
        require(0 < self.step_size <= 1, f"step_size must be in (0, 1], got {self.step_size}")
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")


def embedding_distance(
    surrogates: Sequence[Recognizer], x: torch.Tensor, clean: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per-image mean over surrogates of the cosine distance to the clean embeddings."""
    total = torch.zeros(x.shape[0], device=x.device)
    for model, ref in zip(surrogates, clean, strict=True):
        total = total + (1.0 - (model.embed(x, grad=True) * ref).sum(dim=1))
    return total / len(surrogates)


class PGD(Defense):
    threat_model = ThreatModel.POISONING
    requirements = DefenseRequirements(differentiable_surrogates=True, min_surrogates=1)

    def __init__(self, config: PGDConfig, *, surrogates: Sequence[Recognizer], name: str = "pgd") -> None:
        super().__init__(name=name, budget=Budget(linf=config.epsilon), surrogates=surrogates)
        self.config = config

    @property
    def independent_images(self) -> bool:
        return True

    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        return self._optimise_all(images, self._starts(images, generator))

    def _starts(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Uniform noise in [0, 1) per pixel (drawn whether or not ``random_start`` uses it, as always)."""
        return torch.rand(images.shape, generator=generator, dtype=images.dtype)

    def _optimise(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        with torch.no_grad():
            clean = [s.embed(x) for s in self.surrogates]
        start = (x + (2 * noise - 1) * cfg.epsilon).clamp(0, 1) if cfg.random_start else x
        return signed_gradient_ascent(
            x, start, lambda adv: embedding_distance(self.surrogates, adv, clean),
            epsilon=cfg.epsilon, step_size=cfg.step_size, steps=cfg.steps,
        )  # fmt: skip

    def config_dict(self) -> dict[str, object]:
        return {**super().config_dict(), "config": to_plain(self.config)}


def make_pgd(*, surrogates: Sequence[Recognizer], name: str = "pgd", **config: Any) -> PGD:
    return PGD(build(PGDConfig, config, where=f"defense {name!r}"), surrogates=surrogates, name=name)
