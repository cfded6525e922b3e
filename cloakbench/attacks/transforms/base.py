"""The input-transform contract: what a tracker does to photos before enrolling or querying them.

:meth:`InputTransform.apply` checks the canonical batch, calls the implementation and checks its output.
Each transform has a ``strength`` in its own units (JPEG quality, blur sigma, ...) and a normalised
``intensity`` (0 = identity, 100 = strongest) so plots can put different transforms on one axis.
Reported numbers always come from the real codec or filter.
"""

from __future__ import annotations

import abc
from typing import final

import torch

from cloakbench.errors import ImageContractError
from cloakbench.images import check_images


class InputTransform(abc.ABC):
    name: str

    @property
    @abc.abstractmethod
    def intensity(self) -> float:
        """Normalised strength in [0, 100]; 0 is the identity."""

    @abc.abstractmethod
    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor: ...

    def config_dict(self) -> dict[str, object]:
        return {"name": self.name}

    @final
    def apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        check_images(images, what=f"{self.name}.apply input")
        if images.shape[0] == 0:
            return images.clone()
        out = self._apply(images, generator=generator)
        if out.shape != images.shape:
            raise ImageContractError(f"{self.name}: returned shape {list(out.shape)}, expected {list(images.shape)}")
        return check_images(out, what=f"{self.name}.apply output")


class Identity(InputTransform):
    """No countermeasure."""

    name = "none"

    @property
    def intensity(self) -> float:
        return 0.0

    def _apply(self, images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        return images.clone()
