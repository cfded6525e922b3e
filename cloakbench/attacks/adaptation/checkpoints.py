"""Retrained weights on disk: ``<cache>/checkpoints/<key>.pt``, written atomically, read with ``weights_only``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cloakbench.attacks.adaptation.base import CheckpointStore
from cloakbench.cache import atomic_path, cache_dir, touch

log = logging.getLogger(__name__)


class FileCheckpoints(CheckpointStore):
    def __init__(self, root: Path | None = None, *, enabled: bool = True) -> None:
        self.root = root if root is not None else cache_dir("checkpoints")
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not self.enabled or not path.is_file():
            self.misses += 1
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: retrain rather than fail the cell
            log.warning("%s: unreadable checkpoint (%s); retraining", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        touch(path)  # last use, for pruning least recently used checkpoints (cloakbench cache prune)
        return dict(state)

    def save(self, key: str, state: dict[str, torch.Tensor]) -> None:
        if not self.enabled:
            return
        with atomic_path(self.path(key)) as tmp:
            torch.save(state, tmp)
