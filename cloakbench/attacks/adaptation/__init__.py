"""Model adaptation countermeasures (the tracker retrains its recognizer).

Only the contract lives here for now; end-to-end fine-tuning, robust retraining on cloaked photos of
other identities and PGD adversarial training come with the countermeasures work (issue 5).
"""

from __future__ import annotations

from cloakbench.attacks.adaptation.base import Adaptation

__all__ = ["Adaptation"]
