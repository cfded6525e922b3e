"""The input-transform contract: what a tracker does to photos before enrolling or querying them.

:meth:`InputTransform.apply` checks the canonical batch, calls the implementation and checks its output.
Each transform has a ``strength`` in its own units (JPEG quality, blur sigma, ...) and a normalised
``intensity`` (0 = identity, 100 = strongest) so plots can put different transforms on one axis.
Reported numbers always come from the real codec or filter; :meth:`InputTransform.twin` gives the
differentiable stand-in (:mod:`cloakbench.attacks.transforms.twins`) that optimisation loops may use instead.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, Generic, TypeVar, final

import numpy as np
import torch

from cloakbench.attacks.transforms.twins import DifferentiableTwin
from cloakbench.config import build, to_plain
from cloakbench.errors import ImageContractError
from cloakbench.images import check_images, from_uint8, to_uint8


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

    def twin(self) -> DifferentiableTwin | None:
        """A differentiable stand-in with the same parameters, for optimisation loops only; None if there is none.

        Never use it for a reported number: :meth:`apply` (the real codec or filter) is what a tracker runs.
        """
        return None

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


C = TypeVar("C")
T = TypeVar("T", bound="ConfiguredTransform[Any]")


class ConfiguredTransform(InputTransform, Generic[C]):
    """A transform whose parameters are one frozen config dataclass (:attr:`config_type`).

    Subclasses set ``config_type`` and ``default_name``; :meth:`make` is their registry factory: it validates
    the parameters into the config (errors name the transform) and :meth:`config_dict` carries them.
    """

    config_type: type[C]
    default_name: str

    def __init__(self, config: C, *, name: str | None = None) -> None:
        self.config = config
        self.name = name or self.default_name

    def config_dict(self) -> dict[str, object]:
        return {"name": self.name, "config": to_plain(self.config)}

    @classmethod
    def make(cls: type[T], *, name: str | None = None, **config: Any) -> T:
        name = name or cls.default_name
        return cls(build(cls.config_type, config, where=f"transform {name!r}"), name=name)


def map_uint8(images: torch.Tensor, fn: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    """Apply ``fn`` (uint8 RGB [H, W, 3] -> same) to each image of a canonical batch, as a tracker would.

    Real codecs and filters act on 8-bit images: the batch is rounded to uint8 (:func:`to_uint8`), each image
    is passed to ``fn`` as a C-contiguous array (OpenCV wants one), and the results come back as a canonical
    batch on the input's device.
    """
    arrays = to_uint8(images)
    out = np.stack([fn(np.ascontiguousarray(a)) for a in arrays])
    return from_uint8(out).to(images.device)
