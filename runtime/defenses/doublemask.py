"""Double masking (PatchCleanser, Xiang et al. 2022): certified recovery for any classifier.

Mask set. For every rectangle h x w of the threat, masks of (h + s - 1) x (w + s - 1) pixels (at most the input)
at stride s per axis, the last one flush with the border, deduplicated: every location of every rectangle lies
inside some mask (the covering property). Per axis, a patch starting at t lies in the mask starting at
p = s * floor(t / s) (p <= t and p + h + s - 1 >= t + h), or in the flush last mask when t is past it.
Masked pixels are replaced by one value fixed per bundle (``defense.params.mask_value``, in the space that is
masked), in training and at run time alike (:func:`apply_masks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from certinfer.threat import Threat, parse

Pair = tuple[int, int]


def _pair(stride: int | Sequence[int]) -> Pair:
    pair = tuple(np.atleast_1d(np.asarray(stride)).tolist())
    pair = pair * 2 if len(pair) == 1 else pair
    if len(pair) != 2 or not all(type(v) is int and v >= 1 for v in pair):
        raise ValueError(f"mask stride must be a positive integer or a pair of them, got {stride!r}")
    return pair


def _axis(n: int, size: int, stride: int) -> tuple[list[int], int]:
    """Mask starts along one axis of length ``n`` (every ``stride``, the last flush with the border) and the size."""
    size = min(size, n)
    last = n - size
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts, size


def mask_boxes(input_hw: Pair, threat: str | Threat, stride: int | Sequence[int]) -> np.ndarray:
    """The mask set as boxes: int64 (K, 4) rows ``(top, left, height, width)``, in order of the threat's
    rectangles, then rows, then columns; duplicates dropped (first kept)."""
    hw = (int(input_hw[0]), int(input_hw[1]))
    bound = parse(threat, input_hw=hw) if isinstance(threat, str) else threat.bind(hw)
    sh, sw = _pair(stride)
    boxes: dict[tuple[int, int, int, int], None] = {}
    for h, w in bound.rects:
        rows, mh = _axis(hw[0], h + sh - 1, sh)
        cols, mw = _axis(hw[1], w + sw - 1, sw)
        boxes.update(((r, c, mh, mw), None) for r in rows for c in cols)
    return np.array(list(boxes), dtype=np.int64).reshape(-1, 4)


def box_masks(boxes: np.ndarray, input_hw: Pair) -> np.ndarray:
    """bool (K, H, W) masks, True inside each ``(top, left, height, width)`` box."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    rows, cols = np.arange(input_hw[0]), np.arange(input_hw[1])
    in_rows = (rows[None] >= b[:, :1]) & (rows[None] < b[:, :1] + b[:, 2:3])
    in_cols = (cols[None] >= b[:, 1:2]) & (cols[None] < b[:, 1:2] + b[:, 3:4])
    return in_rows[:, :, None] & in_cols[:, None, :]


def mask_set(input_hw: Pair, threat: str | Threat, stride: int | Sequence[int]) -> np.ndarray:
    """bool (K, H, W), True = masked: the covering mask set of ``threat`` at ``stride`` (see the module docstring)."""
    return box_masks(mask_boxes(input_hw, threat, stride), input_hw)


def apply_masks(x: np.ndarray, masks: np.ndarray, value: float | Sequence[float] = 0.0) -> np.ndarray:
    """Every frame under every mask: (N, C, H, W) and bool (K, H, W) -> float32 (N, K, C, H, W).

    Masked positions take ``value`` (a scalar, or one value per channel), everything else is ``x`` unchanged.
    """
    x = np.asarray(x, dtype=np.float32)
    v = np.asarray(value, dtype=np.float32)
    v = v.reshape(1, 1, -1, 1, 1) if v.ndim else v
    return np.where(np.asarray(masks, dtype=bool)[None, :, None], v, x[:, None])
