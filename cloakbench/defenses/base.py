"""The defense contract: a cloak the user applies to their own photos.

:meth:`Defense.protect` is a template method: it checks the input, calls the implementation's
:meth:`Defense._protect`, then enforces the budget and the [0, 1] range and quantises to the 256 uint8
levels with rounding, as a saved PNG would be. No implementation can skip those steps, and the budget is
re-measured on the quantised output (a violation is a bug and raises).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import final

import torch

from cloakbench.attacks.recognizers.base import Recognizer
from cloakbench.defenses.budgets import Budget
from cloakbench.errors import ConfigError, ImageContractError
from cloakbench.images import check_images


class ThreatModel(enum.Enum):
    POISONING = "poisoning"  # the tracker trains/enrols on cloaked photos, queries clean ones
    EVASION = "evasion"  # cloaked photos sit in a searchable gallery, clean probes search it


@dataclass(frozen=True, kw_only=True)
class DefenseRequirements:
    """What a defense needs from its surrogates."""

    differentiable_surrogates: bool
    min_surrogates: int


class Defense(abc.ABC):
    """Base class of every cloak."""

    name: str
    threat_model: ThreatModel
    budget: Budget
    requirements: DefenseRequirements
    surrogates: tuple[Recognizer, ...]

    def __init__(self, *, name: str, budget: Budget, surrogates: Sequence[Recognizer] = ()) -> None:
        self.name = name
        self.budget = budget
        self.surrogates = tuple(surrogates)
        req = self.requirements
        if len(self.surrogates) < req.min_surrogates:
            raise ConfigError(f"defense {name!r} needs at least {req.min_surrogates} surrogate recognizer(s)")
        if req.differentiable_surrogates:
            black = [s.name for s in self.surrogates if not s.capabilities.differentiable]
            if black:
                raise ConfigError(
                    f"defense {name!r} needs differentiable surrogates; {', '.join(black)} "
                    "is a black box (pick a white-box recognizer such as 'sface')"
                )

    @abc.abstractmethod
    def _protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        """Return cloaked images (any float values; the base class projects, clips and quantises)."""

    @final
    def protect(self, images: torch.Tensor, identities: Sequence[str], *, generator: torch.Generator) -> torch.Tensor:
        """Cloak a canonical batch of one user's (or several users') photos."""
        check_images(images, what=f"{self.name}.protect input")
        if len(identities) != images.shape[0]:
            raise ImageContractError(
                f"{self.name}.protect: {images.shape[0]} images but {len(identities)} identity labels"
            )
        if images.shape[0] == 0:
            return images.clone()
        out = self._protect(images, identities, generator=generator)
        if out.shape != images.shape:
            raise ImageContractError(f"{self.name}: returned shape {list(out.shape)}, expected {list(images.shape)}")
        if not bool(torch.isfinite(out).all()):
            raise ImageContractError(f"{self.name}: produced NaN or infinite pixels")
        out = self.budget.enforce(images, out.detach().to(images.device, torch.float32))
        problems = self.budget.violations(images, out)
        if problems:
            raise AssertionError(
                f"{self.name}: budget {self.budget.describe()} exceeded after quantisation: {'; '.join(problems)}"
            )
        return out

    def config_dict(self) -> dict[str, object]:
        """The parameters that determine the output (for cache keys and the resolved config)."""
        return {
            "name": self.name,
            "budget": self.budget.describe(),
            "surrogates": [(s.name, s.weights_id) for s in self.surrogates],
        }
