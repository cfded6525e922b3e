"""The recognizer zoo: real pretrained face-embedding models behind the :class:`Recognizer` contract."""

from __future__ import annotations

from cloakbench.attacks.recognizers.base import (
    Alignment,
    Capabilities,
    ChannelOrder,
    InputSpec,
    Recognizer,
    TorchRecognizer,
)
from cloakbench.attacks.recognizers.from_file import FileModel, recognizer_from_file
from cloakbench.attacks.recognizers.zoo import RECOGNIZERS

__all__ = [
    "RECOGNIZERS",
    "Alignment",
    "Capabilities",
    "ChannelOrder",
    "FileModel",
    "InputSpec",
    "Recognizer",
    "TorchRecognizer",
    "recognizer_from_file",
]
