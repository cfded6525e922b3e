"""Uniform noise at an L-inf budget: the sanity baseline that should protect almost nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.config import build, require, to_plain
from cloakbench.defenses.base import Defense, DefenseRequirements, ThreatModel
from cloakbench.defenses.budgets import Budget


@dataclass(frozen=True, kw_only=True)
class NoiseConfig:
    epsilon: float = 8 / 255

    def __post_init__(self) -> None:
        require(0 < self.epsilon <= 1, f"epsilon must be in (0, 1], got {self.epsilon}")


class UniformNoise(Defense):
    threat_model = ThreatModel.POISONING
    requirements = DefenseRequirements(differentiable_surrogates=False, min_surrogates=0)

    def __init__(self, config: NoiseConfig, *, surrogates: Sequence[Recognizer] = (), name: str = "noise") -> None:
        # surrogates are accepted (and ignored) so every defense is built the same way by the bench
        super().__init__(name=name, budget=Budget(linf=config.epsilon), surrogates=())
        self.config = config

    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        noise = torch.rand(images.shape, generator=generator, dtype=images.dtype).to(images.device)
        return images + (2 * noise - 1) * self.config.epsilon

    def config_dict(self) -> dict[str, object]:
        return {**super().config_dict(), "config": to_plain(self.config)}


def make_noise(*, surrogates: Sequence[Recognizer] = (), name: str = "noise", **config: Any) -> UniformNoise:
    return UniformNoise(build(NoiseConfig, config, where=f"defense {name!r}"), surrogates=surrogates, name=name)
