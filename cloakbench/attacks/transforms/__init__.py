"""Input-transform countermeasures (real codecs and filters)."""

from __future__ import annotations

from cloakbench.attacks.transforms.base import Identity, InputTransform
from cloakbench.attacks.transforms.registry import TRANSFORMS

__all__ = ["TRANSFORMS", "Identity", "InputTransform"]
