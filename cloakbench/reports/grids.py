"""Image grids that let a person judge a cloak's visibility: original / cloaked / amplified difference."""

from __future__ import annotations

import numpy as np

from cloakbench.errors import ImageContractError


def cloak_grid(originals: np.ndarray, cloaked: np.ndarray, *, amplify: float = 10.0, pad: int = 2) -> np.ndarray:
    """A uint8 [3 rows] grid: the originals, the cloaked photos, and ``128 + amplify * (cloaked - original)``.

    ``originals`` and ``cloaked`` are uint8 ``[n, H, W, 3]`` of one shape; columns are photos, separated
    by ``pad`` white pixels. Pure: the same inputs give the same bytes.
    """
    if originals.shape != cloaked.shape or originals.ndim != 4 or originals.shape[-1] != 3:
        raise ImageContractError(
            f"cloak_grid: originals {originals.shape} and cloaked {cloaked.shape} must both be [n, H, W, 3]"
        )
    if originals.dtype != np.uint8 or cloaked.dtype != np.uint8:
        raise ImageContractError("cloak_grid: images must be uint8")
    n, h, w, _ = originals.shape
    diff = 128.0 + amplify * (cloaked.astype(np.float32) - originals.astype(np.float32))
    rows = [originals, cloaked, np.clip(np.round(diff), 0, 255).astype(np.uint8)]
    grid = np.full((3 * h + 4 * pad, n * w + (n + 1) * pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c in range(n):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = row[c]
    return grid
