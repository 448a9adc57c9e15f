"""De-randomized smoothing ablations (Levine & Feizi 2020): which pixels each base-classifier call keeps.

A column ablation keeps a band of ``size`` columns, a block ablation a ``size`` x ``size`` square; everything
else is ablated. Band ``j`` keeps columns ``[j*stride - (size - 1), j*stride]`` clipped to the image, so every
column is kept by the same number of bands (``size`` at stride 1) without the paper's wrap-around, and the
ensemble of base outputs is a local-feature map whose receptive field is exactly the kept region: its
:class:`Geometry` has ``rf = (H, size)`` (column) or ``(size, size)`` (block), padding ``size - 1``.

The base engine takes (N, 4, H, W) float32: the image in [0, 1] in channels 0-2 and the keep mask in
channel 3; the graph itself encodes kept pixels as (x, 1 - x) and ablated ones as (0, 0).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from certinfer.runtime.geometry import Geometry

MODES = ("column", "block")


def geometry(input_hw: tuple[int, int], mode: str, size: int, stride: int = 1) -> Geometry:
    """The receptive-field geometry of the ablation ensemble (output position = one ablation)."""
    h, w = (int(v) for v in input_hw)
    if mode not in MODES:
        raise ValueError(f"ablation mode {mode!r}: choose from {MODES}")
    if not (1 <= size <= min(h, w) and stride >= 1):
        raise ValueError(f"ablation size {size} and stride {stride} do not fit a {h}x{w} input")
    pad = size - 1
    out_w = (w + 2 * pad - size) // stride + 1
    if mode == "column":
        return Geometry(rf=(h, size), stride=(1, stride), padding=(0, pad), input_hw=(h, w), output_hw=(1, out_w))
    out_h = (h + 2 * pad - size) // stride + 1
    return Geometry(rf=(size, size), stride=(stride, stride), padding=(pad, pad), input_hw=(h, w),
                    output_hw=(out_h, out_w))


def masks(g: Geometry) -> np.ndarray:
    """(K, H, W) float32 keep masks, one per output position in row-major order; read-only and cached."""
    return _masks(g)


@lru_cache(maxsize=16)
def _masks(g: Geometry) -> np.ndarray:
    def axis(a: int) -> np.ndarray:  # (out, in): output i keeps input pixels of its receptive field
        start = np.arange(g.output_hw[a])[:, None] * g.stride[a] - g.padding[a]
        pix = np.arange(g.input_hw[a])[None, :]
        return (pix >= start) & (pix < start + g.rf[a])

    rows, cols = axis(0), axis(1)
    m = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(-1, *g.input_hw).astype(np.float32)
    m.flags.writeable = False
    return m


def batch(images01: np.ndarray, g: Geometry) -> np.ndarray:
    """Every ablation of every image: (N, 3, H, W) in [0, 1] -> (N * K, 4, H, W), image-major, one vectorized copy."""
    m = masks(g)
    n, k = len(images01), len(m)
    out = np.empty((n, k, 4, *g.input_hw), dtype=np.float32)
    out[:, :, :3] = images01[:, None]
    out[:, :, 3] = m[None]
    return out.reshape(n * k, 4, *g.input_hw)
