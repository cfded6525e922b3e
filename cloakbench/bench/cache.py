"""Cache of expensive intermediates (cloaked images, embeddings), keyed by what determines them.

A key is a stable hash of the component's config and the content hashes of its inputs, so a changed
defense parameter, model or photo never reuses a stale array. Arrays are stored as ``.npy`` files
(``allow_pickle=False`` on load) written atomically: a killed run leaves either the whole file or none.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cloakbench.cache import atomic_write_bytes, cache_dir, touch
from cloakbench.config import stable_hash

log = logging.getLogger(__name__)


class ArtifactCache:
    """``get_or_compute(kind, key_parts, compute)``; disabled caches always compute."""

    def __init__(self, root: Path | None = None, *, enabled: bool = True) -> None:
        self.root = root if root is not None else cache_dir("artifacts")
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, key_parts: Any) -> Path:
        return self.root / kind / f"{stable_hash(key_parts, length=24)}.npy"

    def get_or_compute(self, kind: str, key_parts: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.path(kind, key_parts)
        if self.enabled and path.is_file():
            try:
                value = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                log.warning("%s: unreadable cache entry (%s); recomputing", path, exc)
            else:
                self.hits += 1
                touch(path)  # last use, for pruning least recently used entries (cloakbench cache prune)
                return np.asarray(value)
        self.misses += 1
        value = compute()
        if self.enabled:
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)
            atomic_write_bytes(path, buffer.getvalue())
        return value
