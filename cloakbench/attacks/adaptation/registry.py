"""The adaptation registry (``ADAPTATIONS``): CPU-sized entries and ``-full`` entries for GPUs.

``end-to-end``, ``adaptive`` and ``adaptive-end-to-end`` follow FaceCure's recipe (:class:`FaceCureFineTune`);
their ``-full`` entries are FaceCure's sizes (10 epochs x 500 batches of 32; every public photo), and the CPU
entries the same recipe with fewer batches and photos: 1 epoch x 50 batches of 32 (1/100 of FaceCure's 160,000
training examples) and, for the two adaptive ones, 3 photos per public identity.

``end-to-end-anchored``, ``adaptive-anchored`` and ``adversarial`` are our anchored loop (:class:`FineTune`:
Adam, a cosine head initialised at the class centroids, frozen normalisation statistics, an anchor term
towards the original model's embeddings of the clean photos). Their CPU-sized settings (5 epochs, batch 16,
3 public photos per identity, 3 PGD steps) are what the tests and the CPU suites run; their ``-full``
settings use every public photo, 20 epochs of batch 64 and 10-step PGD, and are meant for a GPU.
"""

from __future__ import annotations

from typing import Any

from cloakbench.attacks.adaptation.base import Adaptation, TrainingData
from cloakbench.attacks.adaptation.finetune import FaceCureConfig, FaceCureFineTune, FineTune, FineTuneConfig
from cloakbench.config import build
from cloakbench.registry import EntryMeta, Registry

ADAPTATIONS: Registry[Adaptation] = Registry("adaptation")

FACECURE_PAPER = "Radiya-Dixit et al., Data Poisoning Won't Save You From Facial Recognition"

_FULL: dict[str, Any] = {
    "epochs": 20, "batch_size": 64, "public_per_identity": None, "attack_steps": 10, "attack_step_size": 2 / 255,
}  # fmt: skip
_FACECURE_CPU: dict[str, Any] = {"epochs": 1, "steps_per_epoch": 50, "public_per_identity": 3}  # -full: the defaults

_FACECURE: dict[str, tuple[TrainingData, str]] = {
    "end-to-end": (
        TrainingData.ENROLLMENT,
        "FaceCure's end-to-end tracker (eval_e2e.py): fine-tune the whole extractor, BatchNorm in training mode, "
        "with a new linear softmax head on the tracker's enrollment set (cloaks included); plain cross-entropy, "
        "Adadelta lr 1.0, class-balanced batches of 32, random horizontal flips",
    ),
    "adaptive": (
        TrainingData.PUBLIC_CLOAKED_ALL,
        "FaceCure's adaptive tracker (train_robust_features.py): the end-to-end recipe on public identities' "
        "photos, clean and cloaked by every defense of the suite, labelled correctly; then nearest-neighbour / "
        "linear on its features",
    ),
    "adaptive-end-to-end": (
        TrainingData.ENROLLMENT_PUBLIC_CLOAKED_ALL,
        "FaceCure's adaptive end-to-end tracker (eval_e2e.py --robust): the end-to-end recipe on the enrollment "
        "set (cloaks included) plus the public identities' photos cloaked by every defense of the suite, labelled "
        "correctly; scored by its softmax and by NN / linear on its features",
    ),
}

_ANCHORED: dict[str, tuple[TrainingData, bool, str, str, int]] = {
    "end-to-end-anchored": (
        TrainingData.ENROLLMENT, False,
        "ours: fine-tune the extractor (Adam, frozen BatchNorm statistics) with a cosine softmax head "
        "initialised at the class centroids on the tracker's enrollment set (cloaks included), plus an anchor "
        "towards the original model's embeddings",
        FACECURE_PAPER + " (end-to-end tracker, anchored variant)", 2022,
    ),
    "adaptive-anchored": (
        TrainingData.PUBLIC_CLOAKED, False,
        "ours: the anchored loop on public identities' photos, clean and cloaked by the cell's own defense, "
        "labelled correctly; then nearest-neighbour / linear",
        FACECURE_PAPER + " (adaptive tracker, anchored variant)", 2022,
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


def _facecure_factory(training_data: TrainingData, default_name: str) -> Any:
    def make(*, name: str = default_name, **config: Any) -> FaceCureFineTune:
        cfg = build(FaceCureConfig, config, where=f"adaptation {name!r}")
        return FaceCureFineTune(cfg, name=name, training_data=training_data)

    return make


for _name, (_data, _summary) in _FACECURE.items():
    for _suffix, _defaults in (("", _FACECURE_CPU), ("-full", {})):
        ADAPTATIONS.register(
            f"{_name}{_suffix}",
            _facecure_factory(_data, f"{_name}{_suffix}"),
            defaults=_defaults,
            config=FaceCureConfig,
            runtime_args=("name",),
            meta=EntryMeta(
                summary=_summary + (" (FaceCure's sizes)" if _suffix else " (CPU-sized: 1 x 50 batches)"),
                paper=FACECURE_PAPER,
                year=2022,
                venue="ICLR",
                tags=("adaptation", _data.value, "facecure"),
            ),
        )

for _name, (_data, _adv, _summary, _paper, _year) in _ANCHORED.items():
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
