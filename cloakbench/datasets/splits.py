"""Per-identity train/query splits (DESIGN §4: 70 % training/enrollment, 30 % query, FaceCure's seed 10).

Each identity is split on its own, by a generator seeded from ``(seed, stable integer of the identity
name)``, over that identity's image ids in sorted order. So an identity's split depends only on the seed,
its name and its own images: adding, removing or reordering other identities, or scanning the folder in
another order, never moves one of its images between train and query. The identity integer comes from
SHA-256 (Python's ``hash`` of a string changes from one process to the next).
"""

from __future__ import annotations

import enum
import hashlib
import math

import numpy as np

from cloakbench.datasets.folder import ImageRecord, Manifest
from cloakbench.errors import ConfigError


class Split(enum.Enum):
    TRAIN = "train"
    """Training / enrollment photos (the ones a defense cloaks for the protected identity)."""
    QUERY = "query"
    """Clean query / probe photos the tracker tries to identify."""


def identity_seed(identity: str) -> int:
    """A stable 64-bit integer for an identity name (first 8 bytes of its UTF-8 SHA-256, big-endian)."""
    digest = hashlib.sha256(identity.encode("utf-8", errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big")


def train_count(n: int, train_fraction: float) -> int:
    """How many of ``n`` images go to train: ``round(train_fraction * n)`` clipped to ``[1, n - 1]``.

    ``round`` is Python's (ties to even). One image goes to train; none gives none.
    """
    if n <= 1:
        return n
    return min(max(round(train_fraction * n), 1), n - 1)


def split_per_identity(manifest: Manifest, *, train_fraction: float = 0.7, seed: int = 10) -> dict[str, Split]:
    """Map every ``image_id`` of ``manifest`` to :attr:`Split.TRAIN` or :attr:`Split.QUERY`.

    For each identity, its image ids are sorted, permuted by ``numpy.random.default_rng([seed,
    identity_seed(name)])``, and the first :func:`train_count` of the permutation go to train. Raises
    :class:`ConfigError` for ``train_fraction`` outside the open interval (0, 1) or a negative or
    non-integer ``seed``.
    """
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)):
        raise ConfigError(f"train_fraction must be a number in (0, 1), got {train_fraction!r}")
    if not (math.isfinite(train_fraction) and 0.0 < train_fraction < 1.0):
        raise ConfigError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    result: dict[str, Split] = {}
    for identity, records in manifest.by_identity().items():
        result.update(_split_one(identity, records, train_fraction=train_fraction, seed=int(seed)))
    return {r.image_id: result[r.image_id] for r in manifest.records}


def _split_one(
    identity: str, records: tuple[ImageRecord, ...], *, train_fraction: float, seed: int
) -> dict[str, Split]:
    ids = sorted(r.image_id for r in records)
    rng = np.random.default_rng([seed, identity_seed(identity)])
    order = rng.permutation(len(ids))
    n_train = train_count(len(ids), train_fraction)
    train = {ids[int(i)] for i in order[:n_train]}
    return {image_id: Split.TRAIN if image_id in train else Split.QUERY for image_id in ids}
