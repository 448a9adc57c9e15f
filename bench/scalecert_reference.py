"""Plain reference for ScaleCert (Algorithms 1 and 2), written with loops, one engine call per window.

* Windows: every (p + r - 1)-sided window position inside the frame, grouped per axis while the first and the
  candidate window of a group overlap by at least sqrt(tau) of a side (interval intersection computed directly);
  a merged window is the union box of its group.
* R(x): for every winner, every input pixel of its receptive field from the formula
  ``[i*stride - padding, i*stride - padding + rf - 1]``; a window is evaluated when one of its pixels is in R.
* Each evaluated window: the frame with the window's pixels occluded, run alone through the engine.
* Algorithm 2: every evaluated window's label equals the frame's, with a strictly positive logit gap; the margin
  is the smallest gap over the frame and the evaluated windows.
* Algorithm 1: for every patch location of every rectangle, the windows containing it; alert when all are
  evaluated and share one label other than the frame's; else the majority vote over the evaluated windows'
  labels of all rectangles (ties alert).

``run``: (N, C+1, H, W) float32 -> (logits (N, K), winners (N, H', W')), the bundle's engine. Logits come from
one engine call per window where the runtime batches them, so margins agree to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from certinfer.bench.reference import plain_reference
from certinfer.runtime.defenses.scalecert import ScaleCertCertifier
from certinfer.runtime.geometry import Geometry
from certinfer.runtime.verdict import Certificate, RectCert
from certinfer.threat import rect_key


def axis_groups(side: int, window: int, tau: float) -> list[tuple[int, int]]:
    """Half-open merged ranges on one axis, grouping consecutive window positions greedily."""
    groups, start = [], 0
    while start <= side - window:
        last = start
        while last + 1 <= side - window and (window - (last + 1 - start)) / window >= np.sqrt(tau) - 1e-9:
            last += 1
        groups.append((start, last + window))
        start = last + 1
    return groups


def windows(input_hw: tuple[int, int], rect: tuple[int, int], r: int, tau: float) -> list[tuple[int, int, int, int]]:
    """Merged windows (top, bottom, left, right), half-open, row-major."""
    rows = axis_groups(input_hw[0], min(rect[0] + r - 1, input_hw[0]), tau)
    cols = axis_groups(input_hw[1], min(rect[1] + r - 1, input_hw[1]), tau)
    return [(t, b, l, rr) for t, b in rows for l, rr in cols]


def region(keep: np.ndarray, geometry: Geometry) -> np.ndarray:
    """R as an (H, W) bool map, pixel by pixel."""
    h, w = geometry.input_hw
    out = np.zeros((h, w), bool)
    for i in range(keep.shape[0]):
        for j in range(keep.shape[1]):
            if keep[i, j] > 0:
                top = i * geometry.stride[0] - geometry.padding[0]
                left = j * geometry.stride[1] - geometry.padding[1]
                for a in range(top, top + geometry.rf[0]):
                    for b in range(left, left + geometry.rf[1]):
                        if 0 <= a < h and 0 <= b < w:
                            out[a, b] = True
    return out


def evaluate(run, x: np.ndarray, geometry: Geometry, rect: tuple[int, int], r: int, tau: float):
    """(label, frame logits, [(window, evaluated, logits or None)]) for one prepared frame x (C, H, W)."""
    h, w = x.shape[1:]
    logits0, keep = run(np.concatenate([x, np.zeros((1, h, w), np.float32)])[None])
    R = region(keep[0], geometry)
    results = []
    for t, b, l, rr in windows((h, w), rect, r, tau):
        if not R[t:b, l:rr].any():
            results.append(((t, b, l, rr), False, None))
            continue
        mask = np.zeros((1, h, w), np.float32)
        mask[0, t:b, l:rr] = 1.0
        z, _ = run(np.concatenate([x, mask])[None])
        results.append(((t, b, l, rr), True, z[0]))
    return int(np.argmax(logits0[0])), logits0[0], results


def gap(z: np.ndarray, label: int) -> float:
    """The label's logit minus the best other class's."""
    return float(z[label]) - max(float(v) for c, v in enumerate(z) if c != label)


def margin_reference(label: int, z0: np.ndarray, results) -> float:
    """Algorithm 2's margin: the smallest gap over the frame and every evaluated window (> 0 iff certified)."""
    return min(gap(z, label) for z in [z0] + [z for _, used, z in results if used])


def certify_reference(run, x: np.ndarray, geometry: Geometry, rect: tuple[int, int], r: int, tau: float) -> bool:
    """Algorithm 2, with ties as failures."""
    label, z0, results = evaluate(run, x, geometry, rect, r, tau)
    return margin_reference(label, z0, results) > 0


def alerts(label: int, hw: tuple[int, int], evaluated: dict[tuple[int, int], list]) -> bool:
    """Algorithm 1 over the evaluated windows of every rectangle (rect -> ``evaluate``'s results)."""
    labels = [int(np.argmax(z)) for results in evaluated.values() for _, used, z in results if used]
    if all(v == label for v in labels):
        return False
    for rect, results in evaluated.items():
        for top in range(hw[0] - rect[0] + 1):
            for left in range(hw[1] - rect[1] + 1):
                covering = [(used, z) for (t, b, l, rr), used, z in results
                            if t <= top and top + rect[0] <= b and l <= left and left + rect[1] <= rr]
                said = {int(np.argmax(z)) if used else None for used, z in covering}
                if len(said) == 1 and None not in said and said != {label}:
                    return True
    counts = {v: labels.count(v) for v in set(labels)}
    top_count = max(counts.values())
    return counts.get(label, 0) != top_count or sum(c == top_count for c in counts.values()) > 1


def detect_reference(run, x: np.ndarray, geometry: Geometry, rect: tuple[int, int], r: int, tau: float) -> str:
    """Algorithm 1 for one rectangle: ``"alert"`` or ``"label"``."""
    label, _, results = evaluate(run, x, geometry, rect, r, tau)
    return "alert" if alerts(label, x.shape[1:], {rect: results}) else "label"


@dataclass
class Detection(Certificate):
    """A detection certificate that also says whether Algorithm 1 raised an alert on the frame."""

    alert: bool = False


@plain_reference(margin_rtol=1e-4)
def reference(certifier: ScaleCertCertifier, frames: np.ndarray) -> list[Certificate]:
    """ScaleCert's certificates and alerts, looping over winners and pixels (R), windows and patch positions, one
    engine call per evaluated window."""
    o = certifier.options
    out = []
    for x in certifier.prepare(frames):
        evaluated, per_rect, label = {}, {}, -1
        for rect in certifier.threat.rects:
            label, z0, evaluated[rect] = evaluate(certifier.run_engine, x, certifier.geometry, rect, o.r, o.tau)
            m = margin_reference(label, z0, evaluated[rect])
            per_rect[rect_key(rect)] = RectCert(m > 0, m)
        cert = Certificate.from_rects(str(certifier.threat), per_rect, kind="detection")
        out.append(Detection(**vars(cert), alert=alerts(label, x.shape[1:], evaluated)))
    return out
