"""The adaptation registry (``ADAPTATIONS``): CPU-sized entries and ``-full`` entries for GPUs.

The CPU-sized settings (5 epochs, batch 16, 3 public photos per identity, 3 PGD steps) are what the tests
and the CPU suites run; the ``-full`` settings follow FaceCure's scale (every public photo, more epochs,
10-step PGD) and are meant for a GPU.
"""

from __future__ import annotations

from typing import Any

from cloakbench.attacks.adaptation.base import Adaptation, TrainingData
from cloakbench.attacks.adaptation.finetune import FineTune, FineTuneConfig
from cloakbench.config import build
from cloakbench.registry import EntryMeta, Registry

ADAPTATIONS: Registry[Adaptation] = Registry("adaptation")

_FULL = {"epochs": 20, "batch_size": 64, "public_per_identity": None, "attack_steps": 10, "attack_step_size": 2 / 255}

_KINDS: dict[str, tuple[TrainingData, bool, str, str, int]] = {
    "end-to-end": (
        TrainingData.ENROLLMENT, False,
        "fine-tune the extractor with a softmax head on the tracker's enrollment set (cloaks included)",
        "Radiya-Dixit et al., Data Poisoning Won't Save You From Facial Recognition (end-to-end tracker)", 2022,
    ),
    "adaptive": (
        TrainingData.PUBLIC_CLOAKED, False,
        "FaceCure's adaptive tracker: fine-tune on public identities' photos, clean and cloaked by the same "
        "defense, labelled correctly; then nearest-neighbour / linear",
        "Radiya-Dixit et al., Data Poisoning Won't Save You From Facial Recognition", 2022,
    ),
    "adversarial": (
        TrainingData.PUBLIC_CLEAN, True,
        "PGD adversarial training (Madry) of the extractor on public identities; then nearest-neighbour / linear",
        "Madry et al., Towards Deep Learning Models Resistant to Adversarial Attacks", 2018,
    ),
}  # fmt: skip


def _factory(training_data: TrainingData, adversarial: bool, default_name: str) -> Any:
    def make(*, name: str = default_name, **config: Any) -> FineTune:
        cfg = build(FineTuneConfig, config, where=f"adaptation {name!r}")
        return FineTune(cfg, name=name, training_data=training_data, adversarial=adversarial)

    return make


for _name, (_data, _adv, _summary, _paper, _year) in _KINDS.items():
    _venue = "ICLR"
    for _suffix, _defaults in (("", {}), ("-full", _FULL)):
        ADAPTATIONS.register(
            f"{_name}{_suffix}",
            _factory(_data, _adv, f"{_name}{_suffix}"),
            defaults=_defaults,
            config=FineTuneConfig,
            runtime_args=("name",),
            meta=EntryMeta(
                summary=_summary + (" (GPU-sized)" if _suffix else " (CPU-sized)"),
                paper=_paper,
                year=_year,
                venue=_venue,
                tags=("adaptation", _data.value),
            ),
        )
