"""The adaptation contract: ``adapt(recognizer, data) -> recognizer``.

Kept separate from input transforms (as ART separates preprocessors from trainers): an adaptation changes
the model, a transform changes the pixels.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch

from cloakbench.attacks.recognizers.base import Recognizer


class Adaptation(abc.ABC):
    name: str

    @abc.abstractmethod
    def adapt(self, recognizer: Recognizer, images: torch.Tensor, labels: Sequence[str], *, seed: int) -> Recognizer:
        """Return a new recognizer trained from ``recognizer`` on canonical ``images`` with ``labels``."""
