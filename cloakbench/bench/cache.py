"""Cache of expensive intermediates (cloaked images, embeddings), keyed by what determines them.

A key is a stable hash of the component's config and the content hashes of its inputs, so a changed
defense parameter, model or photo never reuses a stale array. Arrays are stored as ``.npy`` files
(``allow_pickle=False`` on load) written atomically: a killed run leaves either the whole file or none.

Entries whose reuse must be proven (cloaks: a wrong one would be reported as a cloak) go through
:meth:`ArtifactCache.get_verified`: the SHA-256 of the stored bytes is recorded when the entry is written
(``<kind>-sha256/<key>.sha256``) and checked on every read, together with the caller's own check of the value
(the cloak's budget and effect); an entry that fails either is logged and remade, never used. The digest
catches a file changed or damaged after it was written; it is no signature (whoever can write the cache can
write a matching digest), which is why the value is checked as well.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cloakbench.cache import atomic_write_bytes, cache_dir, touch
from cloakbench.config import stable_hash

log = logging.getLogger(__name__)

DIGEST_SUFFIX = "-sha256"
"""``artifacts/<kind>-sha256/<key>.sha256`` holds the SHA-256 (hex) of ``artifacts/<kind>/<key>.npy``."""


class ArtifactCache:
    """``get_or_compute(kind, key_parts, compute)``; disabled caches always compute."""

    def __init__(self, root: Path | None = None, *, enabled: bool = True) -> None:
        self.root = root if root is not None else cache_dir("artifacts")
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, key_parts: Any) -> Path:
        return self.root / kind / f"{stable_hash(key_parts, length=24)}.npy"

    def digest_path(self, kind: str, key_parts: Any) -> Path:
        return self.root / f"{kind}{DIGEST_SUFFIX}" / f"{stable_hash(key_parts, length=24)}.sha256"

    def get_verified(
        self, kind: str, key_parts: Any, compute: Callable[[], np.ndarray], check: Callable[[np.ndarray], str | None]
    ) -> tuple[np.ndarray, str | None]:
        """Like :meth:`get_or_compute`, for entries that must be proven before reuse (module docstring).

        ``check(value)`` returns None when the value is fine, else why not. A stored entry is used only when its
        bytes match the SHA-256 recorded when it was written and it passes ``check``; otherwise a warning names
        the file and the reason, and the value is computed again. Returns the value and what ``check`` found
        wrong with it (None: nothing); a freshly computed value that fails ``check`` is returned, not stored.
        """
        path = self.path(kind, key_parts)
        digest = self.digest_path(kind, key_parts)
        if self.enabled and path.is_file():
            value, problem = _read_verified(path, digest, check)
            if value is not None and problem is None:
                self.hits += 1
                touch(path)
                touch(digest)
                return value, None
            log.warning("%s: cached entry not used (%s); remaking it", path, problem)
        self.misses += 1
        value = compute()
        problem = check(value)
        if self.enabled and problem is None:
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)
            data = buffer.getvalue()
            atomic_write_bytes(path, data)
            atomic_write_bytes(digest, hashlib.sha256(data).hexdigest().encode("ascii"))  # last: no digest, no use
        return value, problem

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


def _read_verified(
    path: Path, digest: Path, check: Callable[[np.ndarray], str | None]
) -> tuple[np.ndarray | None, str | None]:
    """The entry at ``path`` when its bytes match ``digest`` and it passes ``check``; else (None or it, why not)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable: {exc}"
    try:
        recorded = digest.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None, f"no SHA-256 was recorded for it at {digest}"
    if hashlib.sha256(data).hexdigest() != recorded:
        return None, "its bytes do not match the SHA-256 recorded when it was written"
    try:
        value = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as exc:
        return None, f"unreadable: {exc}"
    if not isinstance(value, np.ndarray):
        return None, f"not one array but {type(value).__name__}"
    problem = check(value)
    return value, (None if problem is None else f"it fails the check every fresh one passes: {problem}")
