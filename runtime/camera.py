"""Threats in camera pixels: how far a camera-frame patch reaches in the model input after the bilinear resize.

The runtime resizes a frame (or a detector's box) to the model input with Pillow's bilinear filter, which is
separable: output row i is a weighted sum of the input rows in one window, and likewise for columns. Pillow
computes the window of output index i (for ``src`` input and ``dst`` output pixels on an axis) as

    scale   = src / dst;   support = max(scale, 1)          (the triangle filter, stretched when shrinking)
    centre  = (i + 0.5) * scale
    window  = [int(centre - support + 0.5), int(centre + support + 0.5))   clipped to [0, src)

(``precompute_coeffs`` in Pillow's Resample.c). A weight may round to zero, so the window can only
over-state the dependence: outputs whose windows miss the patch's pixels are bit-identical after the resize.
A patch of p pixels therefore reaches at most :func:`footprint` outputs per axis, a contiguous run, so a
camera patch of P_h x P_w pixels anywhere in a region is covered by a model-pixel patch of
``footprint(P_h) x footprint(P_w)`` somewhere in the model input. The brute-force tests resize patched frames
and check exactly that. A closed-form bound: ``ceil(p * s) + 2`` with ``s = dst / src`` when shrinking or
enlarging up to 2x, ``ceil((p + 1) * s)`` beyond (:func:`footprint_bound`).
"""

from __future__ import annotations

import math

import numpy as np

from certinfer.threat import Rect, Threat, ThreatError, parse


def windows(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """The input window ``[lo, hi)`` of every output index of a ``src -> dst`` bilinear resize (Pillow's)."""
    if src == dst:  # Pillow copies: every output is its own input pixel
        i = np.arange(dst)
        return i, i + 1
    scale = src / dst
    support = max(scale, 1.0)
    centre = (np.arange(dst) + 0.5) * scale
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # int() truncates; centre - support + 0.5 > -1
    hi = np.minimum((centre + support + 0.5).astype(np.int64), src)
    return lo, hi


def footprint(p: int, src: int, dst: int) -> int:
    """The most output pixels on an axis that a run of ``p`` input pixels reaches, over every position."""
    p = min(p, src)
    lo, hi = windows(src, dst)
    start = np.arange(src - p + 1)  # the run covers [start, start + p)
    reached = np.searchsorted(lo, start + p, side="left") - np.searchsorted(hi, start, side="right")
    return int(reached.max())


def footprint_bound(p: int, src: int, dst: int) -> int:
    """A closed-form upper bound on :func:`footprint` (see the module docstring)."""
    s = dst / src
    return math.ceil((p + 1) * s) if s > 2 else math.ceil(p * s) + 2


def to_model(threat: Threat, src_hw: tuple[int, int], model_hw: tuple[int, int]) -> Threat:
    """A camera-pixel threat as model-pixel rectangles for one frame or box of ``src_hw`` resized to ``model_hw``.

    A patch larger than the region is cut to it (what lies outside the region never reaches the model). Raises
    :class:`ThreatError` when a rectangle reaches the whole model input on an axis: no certificate can hold.
    """
    rects: list[Rect] = []
    for h, w in threat.rects:
        rect = (footprint(h, src_hw[0], model_hw[0]), footprint(w, src_hw[1], model_hw[1]))
        if rect[0] >= model_hw[0] or rect[1] >= model_hw[1]:
            raise ThreatError(f"a {h}x{w} camera patch on a {src_hw[1]}x{src_hw[0]} region reaches "
                              f"{rect[0]}x{rect[1]} of the {model_hw[0]}x{model_hw[1]} model input")
        if rect not in rects:
            rects.append(rect)
    return parse(",".join(f"{h}x{w}" for h, w in rects), input_hw=model_hw)
