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
    """Percentile bootstrap interval of the mean of ``values`` (resampling images with replacement).

    Not an interval for a protection rate: photos of one person are not independent, and the percentile
    bootstrap collapses to a point when every photo has the same outcome. Use :func:`protection_interval`.
    """
    if values.size == 0:
        return (float("nan"), float("nan"))
    draws = rng.integers(0, values.size, size=(resamples, values.size))
    means = values[draws].mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def exact_binomial_ci(successes: int, trials: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a binomial proportion: the quantiles of two beta distributions.

    Never zero-width for a finite sample: 6 of 6 gives [0.541, 1.000] at 95 %.
    """
    from scipy.special import betaincinv  # scipy comes with scikit-learn; imported here to keep reports light

    if trials <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    alpha = 1.0 - confidence
    lo = 0.0 if successes == 0 else float(betaincinv(successes, trials - successes + 1, alpha / 2))
    hi = 1.0 if successes == trials else float(betaincinv(successes + 1, trials - successes, 1 - alpha / 2))
    return (lo, hi)


def wilson_ci(successes: int, trials: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (narrower than Clopper-Pearson, close to nominal)."""
    from scipy.special import ndtri

    if trials <= 0:
        return (float("nan"), float("nan"))
    z = float(ndtri(1 - (1 - confidence) / 2))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, float(centre - half)), min(1.0, float(centre + half)))


def clustered_bootstrap_ci(
    values: np.ndarray, clusters: Sequence[str] | np.ndarray, *, rng: np.random.Generator, resamples: int = 1000,
    confidence: float = 0.95,
) -> tuple[float, float]:  # fmt: skip
    """Two-stage percentile bootstrap of a pooled mean whose unit of independence is the cluster.

    Each resample draws as many clusters as there are, with replacement, then within each drawn cluster as many
    of its values as it has, with replacement, and pools them (so a person with more photos weighs more, as in
    the pooled rate). The spread between people enters the interval, which a bootstrap over photos ignores.
    """
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(clusters)
    if values.size == 0:
        return (float("nan"), float("nan"))
    if labels.shape != values.shape:
        raise ValueError(f"{labels.size} cluster labels for {values.size} values")
    groups = [values[labels == c] for c in dict.fromkeys(labels.tolist())]
    sizes = np.array([g.size for g in groups])
    means = np.empty(resamples)
    picks = rng.integers(0, len(groups), size=(resamples, len(groups)))
    for r in range(resamples):
        total, count = 0.0, 0
        for g in picks[r]:
            n = int(sizes[g])
            total += float(groups[g][rng.integers(0, n, size=n)].sum())
            count += n
        means[r] = total / count
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


INTERVAL_METHOD = (
    "one person: exact (Clopper-Pearson) binomial interval over their photos; several people: identity-"
    "clustered bootstrap (people, then their photos, resampled), widened where it is narrower to the exact "
    "binomial interval of the pooled photos"
)
"""What :func:`protection_interval` computes, in words, for tables and docs."""


def protection_interval(
    protected: np.ndarray, identities: Sequence[str] | np.ndarray, *, rng: np.random.Generator,
    resamples: int = 1000, confidence: float = 0.95,
) -> tuple[float, float]:  # fmt: skip
    """The interval cloakbench reports for a protection rate (``protected``: 1 per protected photo, else 0).

    The person is the unit of independence. One person: the exact binomial interval of their photos. Several:
    the identity-clustered bootstrap (:func:`clustered_bootstrap_ci`), widened to the exact binomial interval
    of all the photos where that is wider on either side. The bootstrap alone collapses to a point when every
    photo has the same outcome (6 of 6 would print [1.00, 1.00]) and is too narrow with few people; no sample
    of n photos can know the rate better than n independent ones, so the exact interval is a floor. Never
    zero-width for a finite sample.
    """
    values = np.asarray(protected, dtype=np.float64)
    if values.size == 0:
        return (float("nan"), float("nan"))
    k = round(float(values.sum()))
    exact = exact_binomial_ci(k, int(values.size), confidence=confidence)
    if len(set(np.asarray(identities).tolist())) <= 1:
        return exact
    lo, hi = clustered_bootstrap_ci(values, identities, rng=rng, resamples=resamples, confidence=confidence)
    return (min(lo, exact[0]), max(hi, exact[1]))
