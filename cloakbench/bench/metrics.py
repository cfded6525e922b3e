"""Pure metric functions over classifier scores and per-image outcomes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def true_class_index(classes: Sequence[str], true_labels: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted({t for t in true_labels if t not in index})
    if missing:
        raise ValueError(f"identities {missing} are not among the enrolled classes")
    return np.array([index[t] for t in true_labels], dtype=np.int64)


def rank_of_true(scores: np.ndarray, classes: Sequence[str], true_labels: Sequence[str]) -> np.ndarray:
    """1-based rank of the true identity per query (ties count against it: a pessimistic rank)."""
    idx = true_class_index(classes, true_labels)
    true_scores = scores[np.arange(scores.shape[0]), idx]
    higher_or_equal = (scores >= true_scores[:, None]).sum(axis=1)
    return np.asarray(higher_or_equal, dtype=np.int64)


def gallery_ranks(sims: np.ndarray, gallery_labels: Sequence[str], true_labels: Sequence[str]) -> np.ndarray:
    """Evasion-protocol rank: 1-based position of the first gallery photo of the true identity when the
    gallery is sorted by similarity to the probe (ties count against it). ``sims`` is [Q, G].

    A probe whose identity has no photo in the gallery gets rank G + 1.
    """
    labels = np.asarray(gallery_labels)
    ranks = np.empty(sims.shape[0], dtype=np.int64)
    for q, truth in enumerate(true_labels):
        mine = labels == truth
        if not mine.any():
            ranks[q] = sims.shape[1] + 1
            continue
        best = sims[q, mine].max()
        ranks[q] = 1 + int((sims[q, ~mine] >= best).sum())
    return ranks


def topk_correct(ranks: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(ranks <= k)


def predicted_labels(scores: np.ndarray, classes: Sequence[str]) -> list[str]:
    return [classes[i] for i in scores.argmax(axis=1)]


def protection_rate(correct: np.ndarray) -> float:
    """1 - top-1 accuracy on the protected identities' clean queries."""
    if correct.size == 0:
        return float("nan")
    return float(1.0 - correct.mean())


def bootstrap_ci(
    values: np.ndarray, *, rng: np.random.Generator, resamples: int = 1000, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling images with replacement)."""
    if values.size == 0:
        return (float("nan"), float("nan"))
    draws = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))
