"""The tracker's classifiers over embeddings (DESIGN §4 step 3).

- ``nearest-neighbour``: 1-NN by cosine similarity; a class's score is its best similarity.
- ``linear``: multinomial logistic regression on standardised embeddings (scikit-learn, L-BFGS), the
  linear probe FaceCure uses.

``fit`` takes enrollment embeddings and labels; ``scores`` returns a [Q, C] matrix over ``classes`` from
which top-k, ranks and similarities are read.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloakbench.config import build, require
from cloakbench.registry import EntryMeta, Registry


class Classifier(abc.ABC):
    name: str
    classes: tuple[str, ...]

    @abc.abstractmethod
    def fit(self, embeddings: np.ndarray, labels: Sequence[str]) -> Classifier: ...

    @abc.abstractmethod
    def scores(self, queries: np.ndarray) -> np.ndarray:
        """[Q, C] scores, higher is more likely, columns ordered as :attr:`classes`."""


def _check_fit_input(embeddings: np.ndarray, labels: Sequence[str]) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] != len(labels):
        raise ValueError(f"fit: {embeddings.shape} embeddings for {len(labels)} labels")
    if len(set(labels)) < 2:
        raise ValueError("fit: need at least two identities to classify")


class NearestNeighbour(Classifier):
    name = "nearest-neighbour"

    def fit(self, embeddings: np.ndarray, labels: Sequence[str]) -> NearestNeighbour:
        _check_fit_input(embeddings, labels)
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        self._gallery = (embeddings / np.clip(norms, 1e-12, None)).astype(np.float32)
        self.classes = tuple(sorted(set(labels)))
        index = {c: i for i, c in enumerate(self.classes)}
        self._label_idx = np.array([index[label] for label in labels])
        return self

    def scores(self, queries: np.ndarray) -> np.ndarray:
        q = queries / np.clip(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12, None)
        sims = q.astype(np.float32) @ self._gallery.T  # [Q, N]
        out = np.full((q.shape[0], len(self.classes)), -np.inf, dtype=np.float32)
        for c in range(len(self.classes)):
            out[:, c] = sims[:, self._label_idx == c].max(axis=1)
        return out


@dataclass(frozen=True, kw_only=True)
class LinearConfig:
    c: float = 1.0  # inverse L2 regularisation strength
    max_iter: int = 1000

    def __post_init__(self) -> None:
        require(self.c > 0, f"c must be positive, got {self.c}")
        require(self.max_iter >= 1, f"max_iter must be >= 1, got {self.max_iter}")


class LinearProbe(Classifier):
    name = "linear"

    def __init__(self, config: LinearConfig) -> None:
        self.config = config

    def fit(self, embeddings: np.ndarray, labels: Sequence[str]) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        _check_fit_input(embeddings, labels)
        x = embeddings.astype(np.float64)
        self._mean = x.mean(axis=0)
        self._std = x.std(axis=0) + 1e-8
        model = LogisticRegression(C=self.config.c, max_iter=self.config.max_iter, tol=1e-6)
        model.fit((x - self._mean) / self._std, np.asarray(labels))
        self._model = model
        self.classes = tuple(str(c) for c in model.classes_)
        return self

    def scores(self, queries: np.ndarray) -> np.ndarray:
        x = (queries.astype(np.float64) - self._mean) / self._std
        return np.asarray(self._model.predict_log_proba(x), dtype=np.float64)


def _nn(**config: Any) -> NearestNeighbour:
    if config:
        from cloakbench.errors import ConfigError

        raise ConfigError(f"classifier 'nearest-neighbour' takes no parameters, got {sorted(config)}")
    return NearestNeighbour()


def _linear(**config: Any) -> LinearProbe:
    return LinearProbe(build(LinearConfig, config, where="classifier 'linear'"))


CLASSIFIERS: Registry[Classifier] = Registry("classifier")
CLASSIFIERS.register("nearest-neighbour", _nn, meta=EntryMeta(summary="1-NN on cosine similarity of embeddings"))
CLASSIFIERS.register(
    "linear",
    _linear,
    meta=EntryMeta(summary="multinomial logistic regression on standardised embeddings (scikit-learn L-BFGS)"),
)
