"""Summed-area tables and all-window sums, shared by the certifiers.

Maps are laid out ``(..., H, W, C)``: any leading batch axes, two spatial axes, a trailing channel
(class) axis. Windows are given per axis as half-open ranges, so a rectangle at every location is a
grid of ``len(rows) x len(cols)`` windows whose sizes may vary (clipped at the border).
"""

from __future__ import annotations

import numpy as np


def table(x: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: ``t[..., i, j, :] = x[..., :i, :j, :].sum()``.

    Integer maps are summed in int64 (exact); floating maps in float64.
    """
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"expected a (..., H, W, C) map, got shape {x.shape}")
    acc = np.int64 if (np.issubdtype(x.dtype, np.integer) or x.dtype == bool) else np.float64
    t = np.zeros(x.shape[:-3] + (x.shape[-3] + 1, x.shape[-2] + 1, x.shape[-1]), dtype=acc)
    np.cumsum(np.cumsum(x, axis=-3, dtype=acc), axis=-2, out=t[..., 1:, 1:, :])
    return t


def window_sums(t: np.ndarray, rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Sums over every window ``rows[k] x cols[l]`` of the map behind table ``t``.

    ``rows = (lo, hi)`` and ``cols = (lo, hi)`` are integer arrays of half-open ranges. Returns
    ``(..., len(rows), len(cols), C)``.
    """
    r0, r1 = (np.asarray(a, dtype=np.intp) for a in rows)
    c0, c1 = (np.asarray(a, dtype=np.intp) for a in cols)
    tr1, tr0 = t[..., r1, :, :], t[..., r0, :, :]  # (..., R, W+1, C)
    return (tr1[..., c1, :] - tr1[..., c0, :]) - (tr0[..., c1, :] - tr0[..., c0, :])


def window_sizes(rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Number of cells in each window of the grid ``rows x cols``: ``(len(rows), len(cols))``."""
    return np.outer(np.asarray(rows[1]) - rows[0], np.asarray(cols[1]) - cols[0])
