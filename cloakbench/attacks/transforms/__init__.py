"""Input-transform countermeasures (real codecs and filters) and their differentiable twins.

Registered (``TRANSFORMS``): ``none``, ``jpeg`` (quality, subsampling), ``blur`` (sigma, kernel), ``median``
(size), ``resize`` (factor), ``bit-depth`` (bits), ``gaussian-noise`` (sigma). Each has a normalised
``intensity`` (0 = identity, 100 = the strongest setting worth plotting; each module says why its anchor).
Reported numbers come from the real transform; ``transform.twin()`` (JPEG, blur, resize) is a differentiable
stand-in for optimisation loops only.
"""

from __future__ import annotations

from cloakbench.attacks.transforms.base import Identity, InputTransform
from cloakbench.attacks.transforms.filters import GaussianBlur, MedianFilter
from cloakbench.attacks.transforms.jpeg import JPEG
from cloakbench.attacks.transforms.quantization import BitDepth, GaussianNoise
from cloakbench.attacks.transforms.registry import TRANSFORMS
from cloakbench.attacks.transforms.resize import Resize
from cloakbench.attacks.transforms.twins import DifferentiableTwin, GaussianBlurTwin, JPEGTwin, ResizeTwin

__all__ = [
    "JPEG",
    "TRANSFORMS",
    "BitDepth",
    "DifferentiableTwin",
    "GaussianBlur",
    "GaussianBlurTwin",
    "GaussianNoise",
    "Identity",
    "InputTransform",
    "JPEGTwin",
    "MedianFilter",
    "Resize",
    "ResizeTwin",
]
