"""Plain reference implementations of BagCert certification, written straight from the paper.

Metzen & Yatsura 2021, Sec. 3.2. For predicted class ``t``, a patch at location ``l`` can change only the cells
``R(l)`` whose receptive field meets it; output ``i`` (per axis) sees input pixels
``[i*stride - padding, i*stride - padding + rf - 1]``.

* Condition 3.1 (:func:`condition_31_margin`): build the worst-case map ``s_wc(l)`` for every location (every
  cell of ``R(l)`` votes for every class but ``t``), sum it, and compare the classes. Literal and very slow:
  only for tests on small maps.
* Condition 3.2 (:func:`certify_reference`): ``out_t(l) - max_{c != t} out_c(l) > |R(l)|`` for every location
  of every rectangle, where ``out_c(l)`` counts the votes of class ``c`` outside ``R(l)``. Loops over patch
  locations, over outputs (to build ``R(l)`` from the formula above) and over classes; numpy only adds up the
  cells outside ``R(l)``. No summed-area tables, no geometry helper: this is the "paper pseudo-code" baseline
  that ``certinfer bench latency`` times against the vectorized :func:`certinfer.runtime.defenses.bagcert.certify`.
* Condition 3.3 (:func:`rect_margin_33`): ``S_t - max_{c != t} S_c > 2 max_l |R(l)|``, |R(l)| counted per location.

Both return margins in the units of ``bagcert.certify`` (the slack of the deciding inequality, in cells; > 0
exactly when certified), so certificates can be compared number for number.
"""

from __future__ import annotations

import numpy as np

from certinfer.bench.reference import plain_reference
from certinfer.runtime.defenses.bagcert import BagCertCertifier
from certinfer.runtime.geometry import Geometry
from certinfer.runtime.verdict import Certificate, RectCert
from certinfer.threat import Threat, parse, rect_key


def sees(i: int, axis: int, geometry: Geometry, start: int, size: int) -> bool:
    """Whether output ``i`` on ``axis`` sees any of the input pixels ``[start, start + size - 1]``."""
    first = i * geometry.stride[axis] - geometry.padding[axis]
    last = first + geometry.rf[axis] - 1
    return first <= start + size - 1 and start <= last


def affected_set(geometry: Geometry, rect: tuple[int, int], location: tuple[int, int]) -> np.ndarray:
    """R(l) as a boolean (H', W') mask: the outputs whose receptive field meets the patch at ``location``."""
    h, w = rect
    top, left = location
    rows = [i for i in range(geometry.output_hw[0]) if sees(i, 0, geometry, top, h)]
    cols = [j for j in range(geometry.output_hw[1]) if sees(j, 1, geometry, left, w)]
    mask = np.zeros(geometry.output_hw, dtype=bool)
    for i in rows:
        for j in cols:
            mask[i, j] = True
    return mask


def locations(geometry: Geometry, rect: tuple[int, int]):
    """Every top-left corner of a ``rect`` patch fully inside the input."""
    h, w = rect
    for top in range(geometry.input_hw[0] - h + 1):
        for left in range(geometry.input_hw[1] - w + 1):
            yield top, left


def worst_case_uncertain(s: np.ndarray, label: int, uncertain: np.ndarray | None) -> np.ndarray:
    """Cells near the threshold are adversarial everywhere: ``label`` loses them, every other class gains them."""
    s = (np.asarray(s) != 0).astype(np.int64)
    if uncertain is None:
        return s
    u = np.asarray(uncertain).reshape(s.shape) != 0
    out = s.copy()
    for c in range(s.shape[-1]):
        out[..., c][u[..., c]] = 0 if c == label else 1
    return out


def rect_margin_32(s: np.ndarray, label: int, geometry: Geometry, rect: tuple[int, int]) -> int:
    """Condition 3.2 slack for one rectangle: min over locations of out_t - max_{c != t} out_c - |R(l)|."""
    worst = None
    for loc in locations(geometry, rect):
        inside = affected_set(geometry, rect, loc)
        outside = ~inside
        votes = [int(s[..., c][outside].sum()) for c in range(s.shape[-1])]
        best_other = max(votes[c] for c in range(len(votes)) if c != label)
        slack = votes[label] - best_other - int(inside.sum())
        worst = slack if worst is None else min(worst, slack)
    return worst


def rect_margin_33(s: np.ndarray, label: int, geometry: Geometry, rect: tuple[int, int]) -> int:
    """Condition 3.3 slack for one rectangle: S_t - max_{c != t} S_c - 2 max over locations of |R(l)|."""
    votes = [int(s[..., c].sum()) for c in range(s.shape[-1])]
    best_other = max(votes[c] for c in range(len(votes)) if c != label)
    largest = max(int(affected_set(geometry, rect, loc).sum()) for loc in locations(geometry, rect))
    return votes[label] - best_other - 2 * largest


def certify_reference(scores: np.ndarray, label: int, geometry: Geometry, threat: Threat | str,
                      uncertain: np.ndarray | None = None, condition: str = "3.2") -> Certificate:
    """Condition 3.2 (or 3.3) for every rectangle of ``threat`` on one binary map (H', W', C), the plain way."""
    threat = parse(threat) if isinstance(threat, str) else threat
    threat = threat.bind(geometry.input_hw)
    s = worst_case_uncertain(scores, int(label), uncertain)
    if s.ndim != 3:
        raise ValueError(f"scores must be (H', W', C), got shape {np.shape(scores)}")
    margin = {"3.2": rect_margin_32, "3.3": rect_margin_33}[condition]
    per_rect = {}
    for rect in threat.rects:
        m = margin(s, int(label), geometry, rect)
        per_rect[rect_key(rect)] = RectCert(bool(m > 0), float(m))
    return Certificate.from_rects(str(threat), per_rect)


@plain_reference()
def reference(certifier: BagCertCertifier, frames: np.ndarray) -> list[Certificate]:
    """BagCert's certificates, looping over patch locations, outputs and classes on the certifier's binary maps."""
    features = certifier.infer(certifier.prepare(frames))
    out = []
    for i, scores in enumerate(features.scores):
        label = int(np.argmax((scores != 0).sum(axis=(0, 1))))  # g_Sigma; the lowest class wins a tie
        uncertain = None if features.uncertain is None else features.uncertain[i]
        out.append(certify_reference(scores, label, certifier.geometry, certifier.threat, uncertain,
                                     certifier.options.condition))
    return out


def condition_31_margin(s: np.ndarray, label: int, geometry: Geometry, rect: tuple[int, int]) -> int:
    """Condition 3.1 literally: the worst-case map for every location, summed, classes compared.

    Returns min over l of [votes_t - max_{c != t} votes_c] in s_wc(l); Condition 3.2's slack equals it number
    for number (|R(l)| is already inside s_wc). Pure Python loops over cells: small maps only.
    """
    s = (np.asarray(s) != 0).astype(np.int64)
    h, w = rect
    worst = None
    for top, left in locations(geometry, rect):
        wc = s.copy()
        for i in range(geometry.output_hw[0]):
            for j in range(geometry.output_hw[1]):
                rows = range(i * geometry.stride[0] - geometry.padding[0],
                             i * geometry.stride[0] - geometry.padding[0] + geometry.rf[0])
                cols = range(j * geometry.stride[1] - geometry.padding[1],
                             j * geometry.stride[1] - geometry.padding[1] + geometry.rf[1])
                if set(rows) & set(range(top, top + h)) and set(cols) & set(range(left, left + w)):
                    wc[i, j, :] = 1
                    wc[i, j, label] = 0
        votes = wc.sum(axis=(0, 1))
        gap = int(votes[label] - np.delete(votes, label).max())
        worst = gap if worst is None else min(worst, gap)
    return worst
