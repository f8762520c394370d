"""Pool a patch grid to a coarser one: what a reranker reading fewer patch tokens is given.

Adaptive average pooling with torch's bins (`adaptive_avg_pool2d`): output cell i covers input rows
floor(i * H / G) .. ceil((i + 1) * H / G) - 1, so 7 -> 3 uses overlapping 3-row bins. numpy only, so
the index and the service pool exactly as training does.
"""
from __future__ import annotations

import numpy as np


def _bins(size: int, out: int) -> list[tuple[int, int]]:
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def pool_patches(patches: np.ndarray, source_grid: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """(n, H*W, C) patches on `source_grid` -> float32 (n, G0*G1, C) on `grid` (row-major both)."""
    h, w = (int(x) for x in source_grid)
    g0, g1 = (int(x) for x in grid)
    n, p, c = patches.shape
    if p != h * w:
        raise ValueError(f"{p} patches do not make a {h}x{w} grid")
    if not (1 <= g0 <= h and 1 <= g1 <= w):
        raise ValueError(f"cannot pool a {h}x{w} grid to {g0}x{g1}")
    if (g0, g1) == (h, w):
        return np.asarray(patches, dtype=np.float32)
    x = np.asarray(patches, dtype=np.float32).reshape(n, h, w, c)
    out = np.empty((n, g0, g1, c), np.float32)
    for i, (r0, r1) in enumerate(_bins(h, g0)):
        rows = x[:, r0:r1].mean(axis=1)
        for j, (c0, c1) in enumerate(_bins(w, g1)):
            out[:, i, j] = rows[:, c0:c1].mean(axis=1)
    return out.reshape(n, g0 * g1, c)


__all__ = ["pool_patches"]
