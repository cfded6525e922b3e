"""The adaptation contract: the tracker retrains its recognizer (DESIGN §7).

Kept separate from input transforms (as ART separates preprocessors from trainers): an adaptation changes
the model, a transform changes the pixels.

An :class:`Adaptation` declares which data it trains on (:class:`TrainingData`), and the bench assembles
that data from the suite (the adaptation knows nothing of suites or defenses):

- ``end-to-end`` (and ``end-to-end-anchored``): the tracker's own enrollment set, the protected user's cloaked
  photos included;
- ``adaptive``: photos of *public* identities (the tracker's own collection, not the protected users), clean
  and cloaked by every defense of the suite, each cloak labelled with its true identity (FaceCure's robust
  extractor, ``train_robust_features.py``);
- ``adaptive-end-to-end``: the enrollment set as ``end-to-end`` sees it plus the public identities' enrollment
  photos cloaked by every defense of the suite, labelled correctly (FaceCure's ``eval_e2e.py --robust``);
- ``adaptive-anchored``: the same public photos, clean and cloaked by the cell's own defense only;
- ``adversarial``: clean photos of public identities; the cloaks are made on the fly by PGD against the
  model being trained (Madry et al.'s adversarial training).

:meth:`Adaptation.adapt` returns an :class:`Adapted`: a new white-box recognizer (the original is left
untouched), the softmax head it was trained with (the end-to-end tracker classifies with it), and a
:class:`TrainReport` of what the training did and how fast.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cloakbench.attacks.recognizers.base import Recognizer, TorchRecognizer
from cloakbench.errors import ConfigError, ImageContractError
from cloakbench.images import check_images


class TrainingData(enum.Enum):
    ENROLLMENT = "enrollment"  # the tracker's enrollment set as it is (cloaks included)
    PUBLIC_CLOAKED = "public-cloaked"  # public identities, clean + cloaked by the same defense
    PUBLIC_CLOAKED_ALL = "public-cloaked-all"  # public identities, clean + cloaked by every defense of the suite
    PUBLIC_CLEAN = "public-clean"  # public identities, clean (adversarial training makes its own perturbations)
    # the enrollment set as it is, plus the public identities' enrollment photos cloaked by every defense of
    # the suite, labelled correctly (FaceCure's eval_e2e.py --robust: the adaptive end-to-end tracker)
    ENROLLMENT_PUBLIC_CLOAKED_ALL = "enrollment-public-cloaked-all"

    @property
    def end_to_end(self) -> bool:
        """Trains a softmax head over the enrollment set's identities (one model per protected user)."""
        return self in (TrainingData.ENROLLMENT, TrainingData.ENROLLMENT_PUBLIC_CLOAKED_ALL)


@dataclass(frozen=True)
class TrainingSet:
    """Canonical images with identity labels, and each image's clean counterpart.

    ``references`` are what the anchor term pulls the new embeddings towards (through the frozen original
    model): for a cloaked photo its clean original, for a clean photo itself. ``None`` means "the images
    themselves".
    """

    images: torch.Tensor
    labels: tuple[str, ...]
    references: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_images(self.images, what="training images")
        if self.images.shape[0] != len(self.labels):
            raise ImageContractError(f"training set: {self.images.shape[0]} images but {len(self.labels)} labels")
        if len(set(self.labels)) < 2:
            raise ConfigError(f"training set: needs at least 2 identities, got {sorted(set(self.labels))}")
        if self.references is not None and self.references.shape != self.images.shape:
            raise ImageContractError(
                f"training set: references {list(self.references.shape)} != images {list(self.images.shape)}"
            )


@dataclass(frozen=True, kw_only=True)
class TrainReport:
    """What one fine-tuning run did; ``images_per_s`` counts every training example seen (epochs included)."""

    adaptation: str
    n_images: int
    n_identities: int
    epochs: int
    seconds: float
    images_per_s: float
    cached: bool
    device: str
    final_loss: float
    final_train_accuracy: float
    config_hash: str
    history: tuple[dict[str, float], ...] = field(default_factory=tuple)

    def to_row(self) -> dict[str, object]:
        return {
            "adaptation": self.adaptation, "n_images": self.n_images, "n_identities": self.n_identities,
            "epochs": self.epochs, "seconds": self.seconds, "images_per_s": self.images_per_s,
            "cached": self.cached, "device": self.device, "final_loss": self.final_loss,
            "final_train_accuracy": self.final_train_accuracy, "config_hash": self.config_hash,
        }  # fmt: skip


@dataclass
class Adapted:
    """A retrained recognizer and the softmax head trained with it.

    The head is either a cosine head on the unit-norm embedding (``bias`` is None: unit-norm class weights, the
    anchored recipe) or a linear layer with a bias on the extractor's raw output (FaceCure's recipe), which
    comes with :attr:`logits`, the model up to its softmax as a recognizer: its embeddings (logits over their
    norm) are the scores, since the head's input is not the unit-norm embedding."""

    recognizer: TorchRecognizer
    classes: tuple[str, ...]
    head: torch.Tensor  # [C, D] class weights
    report: TrainReport
    bias: torch.Tensor | None = None  # [C]; None: a cosine head
    logits: TorchRecognizer | None = None  # extractor + linear head; embedding dimension C (columns: classes)

    def head_scores(self, embeddings: np.ndarray) -> np.ndarray:
        """[Q, C] cosine scores of unit-norm embeddings for a cosine head's classes (columns: :attr:`classes`);
        their argmax and ranking are the softmax's. A linear head is scored through :attr:`logits` instead."""
        if self.bias is not None:
            raise ValueError("a linear head reads the raw features: score it with the `logits` recognizer")
        x = np.asarray(embeddings, dtype=np.float32)
        w = F.normalize(self.head.detach().cpu().float(), dim=1).numpy()
        cosines: np.ndarray = x @ w.T
        return cosines


class Adaptation(abc.ABC):
    """Base class of every model-adaptation countermeasure."""

    name: str
    training_data: TrainingData

    @abc.abstractmethod
    def adapt(
        self, recognizer: Recognizer, data: TrainingSet, *, seed: int, checkpoints: CheckpointStore | None = None,
        progress: bool = False,
    ) -> Adapted:  # fmt: skip
        """Train a copy of ``recognizer`` on ``data``; the original is not modified."""

    @abc.abstractmethod
    def config_dict(self) -> dict[str, object]: ...


class CheckpointStore(abc.ABC):
    """Where retrained weights are cached (keyed by the hash of config, base weights, data and seed)."""

    @abc.abstractmethod
    def load(self, key: str) -> dict[str, torch.Tensor] | None: ...

    @abc.abstractmethod
    def save(self, key: str, state: dict[str, torch.Tensor]) -> None: ...


def require_white_box(recognizer: Recognizer, adaptation: str) -> TorchRecognizer:
    if not isinstance(recognizer, TorchRecognizer):
        raise ConfigError(
            f"adaptation {adaptation!r} retrains the model's weights, so it needs a white-box PyTorch recognizer; "
            f"{recognizer.name!r} is not one (use 'sface', 'facenet-casia' or 'facenet-msceleb')"
        )
    return recognizer


def label_indices(labels: Sequence[str]) -> tuple[tuple[str, ...], torch.Tensor]:
    classes = tuple(sorted(set(labels)))
    index = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([index[label] for label in labels], dtype=torch.long)
