"""Receptive-field geometry of a local-feature model: which outputs a patch can touch.

Output position ``i`` (per axis) sees input pixels ``[i*stride - padding, i*stride - padding + rf - 1]``.
A patch covering input pixels ``[t, t + h - 1]`` can change output ``i`` exactly when the two ranges meet,
so the affected outputs are ``ceil((t + padding - rf + 1) / stride) <= i <= floor((t + h - 1 + padding) / stride)``,
clipped to the output. Ranges here are half-open ``[lo, hi)``; an empty range has ``lo == hi``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

Pair = tuple[int, int]


def _pair(v) -> Pair:
    a, b = (int(x) for x in v)
    return a, b


@dataclass(frozen=True)
class Geometry:
    rf: Pair
    stride: Pair
    padding: Pair
    input_hw: Pair
    output_hw: Pair

    def __post_init__(self) -> None:
        for name in ("rf", "stride", "padding", "input_hw", "output_hw"):
            object.__setattr__(self, name, _pair(getattr(self, name)))
        if min(self.rf + self.stride + self.input_hw + self.output_hw) < 1 or min(self.padding) < 0:
            raise ValueError(f"invalid geometry {self.to_dict()}")

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(**{k: d[k] for k in ("rf", "stride", "padding", "input_hw", "output_hw")})

    def to_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("rf", "stride", "padding", "input_hw", "output_hw")}

    def _axis_ranges(self, axis: int, start: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        rf, s, p, n = self.rf[axis], self.stride[axis], self.padding[axis], self.output_hw[axis]
        lo = -((rf - 1 - p - start) // s)  # ceil((start + p - rf + 1) / s) in integer arithmetic
        hi = (start + size - 1 + p) // s + 1
        lo, hi = np.clip(lo, 0, n), np.clip(hi, 0, n)
        return lo, np.maximum(hi, lo)

    def affected(self, rect: Pair, location: Pair) -> tuple[Pair, Pair]:
        """Half-open (rows, cols) output ranges a ``rect`` patch with top-left ``location`` can change."""
        (r0, r1), (c0, c1) = (self._axis_ranges(a, np.asarray(location[a]), rect[a]) for a in (0, 1))
        return (int(r0), int(r1)), (int(c0), int(c1))

    def affected_ranges(self, rect: Pair) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Affected ranges for every location of ``rect`` inside the input.

        Returns ``((row_lo, row_hi), (col_lo, col_hi))``: the row range depends only on the patch's top row
        (``H - h + 1`` of them), the column range only on its left column (``W - w + 1``). The arrays are
        cached per geometry and rectangle (certification asks for them on every frame) and read-only.
        """
        return _affected_ranges(self, (int(rect[0]), int(rect[1])))

    def max_affected(self, rect: Pair) -> int:
        """The largest number of outputs one ``rect`` patch can change (R^max of BagCert)."""
        (r0, r1), (c0, c1) = self.affected_ranges(rect)
        return int((r1 - r0).max() * (c1 - c0).max())


@lru_cache(maxsize=1024)
def _affected_ranges(g: Geometry, rect: Pair) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    h, w = rect
    if h > g.input_hw[0] or w > g.input_hw[1]:
        raise ValueError(f"patch {h}x{w} does not fit the {g.input_hw[0]}x{g.input_hw[1]} input")
    rows = g._axis_ranges(0, np.arange(g.input_hw[0] - h + 1), h)
    cols = g._axis_ranges(1, np.arange(g.input_hw[1] - w + 1), w)
    for a in rows + cols:
        a.flags.writeable = False
    return rows, cols
