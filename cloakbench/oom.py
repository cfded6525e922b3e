"""Out-of-memory back-off: run a batched computation, halving the batch on a CUDA out-of-memory error.

Used where a batch size is a choice, not a result: embedding (``cloakbench.bench``), cloaking
(:meth:`cloakbench.defenses.base.Defense.protect`) and the timing suite. A module of its own below both, so the
defenses need not import the bench.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class OomRecord:
    """What :func:`run_with_oom_retry` tried: the batch sizes in order (the last one succeeded)."""

    tried: tuple[int, ...]
    halvings: int

    @property
    def final_batch(self) -> int:
        return self.tried[-1]


def is_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (``torch.cuda.OutOfMemoryError`` or a RuntimeError saying so)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


def run_with_oom_retry(fn: Callable[[int], T], batch: int, *, min_batch: int = 1) -> tuple[T, OomRecord]:
    """``fn(batch)``; on a CUDA out-of-memory error empty the CUDA cache, halve the batch (not below
    ``min_batch``) and retry. An OOM at ``min_batch`` and every other exception propagate unchanged."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"run_with_oom_retry: batch must be an integer >= 1, got {batch!r}")
    if isinstance(min_batch, bool) or not isinstance(min_batch, int) or not 1 <= min_batch <= batch:
        raise ValueError(f"run_with_oom_retry: min_batch must be an integer in 1..{batch}, got {min_batch!r}")
    tried: list[int] = []
    while True:
        tried.append(batch)
        try:
            result = fn(batch)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not is_oom(exc) or batch <= min_batch:
                raise
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            return result, OomRecord(tried=tuple(tried), halvings=len(tried) - 1)
        # outside the except block, so the traceback's frames (and the tensors they hold) are gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        new_batch = max(min_batch, batch // 2)
        log.warning("CUDA out of memory at batch %d (%s); retrying at batch %d", batch, message, new_batch)
        batch = new_batch
