"""Model-adaptation countermeasures: the tracker retrains its recognizer (PyTorch Lightning)."""

from __future__ import annotations

from cloakbench.attacks.adaptation.base import Adaptation, Adapted, TrainingData, TrainingSet, TrainReport
from cloakbench.attacks.adaptation.checkpoints import FileCheckpoints
from cloakbench.attacks.adaptation.registry import ADAPTATIONS

__all__ = ["ADAPTATIONS", "Adaptation", "Adapted", "FileCheckpoints", "TrainReport", "TrainingData", "TrainingSet"]
