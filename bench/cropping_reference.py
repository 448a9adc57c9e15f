"""Plain reference for randomized cropping (Lin et al. 2021, Eq. 2 to 6), written with loops.

For one frame: the vote of every crop (its logits' argmax, lowest class on ties) counted crop by crop; the top
two counts n1, n2 found class by class; per rectangle, n_adv (Eq. 2) as the most crop positions one patch
position overlaps, by looping over every patch position and every crop position on each axis; then the tail of
the overlap count X (binomial with replacement, hypergeometric without; Eq. 4 to 6) summed term by term in exact
fractions until it reaches the threshold, which gives the overlap bound t. Certified for a rectangle when
n1 - n2 > 2 t (ties as flips), exhaustive mode when n1 - n2 > 2 n_adv; margins in the units of
``cropping.vote_certificates`` (votes), so certificates compare number for number. ``certinfer bench latency``
times this (:func:`reference`: from the votes of the certifier's own crops) against the vectorized runtime.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from certinfer.bench.reference import plain_reference
from certinfer.runtime.defenses.cropping import CroppingCertifier
from certinfer.runtime.verdict import Certificate, RectCert
from certinfer.threat import Threat, rect_key


def votes_reference(logits: np.ndarray) -> list[int]:
    """Votes per class of one frame's crop logits (n, C)."""
    counts = [0] * logits.shape[1]
    for row in logits:
        best = 0
        for c in range(1, len(row)):
            if row[c] > row[best]:
                best = c
        counts[best] += 1
    return counts


def axis_overlaps(m: int, k: int, p: int) -> int:
    """The most crop positions (side k) that one patch position (side p) overlaps on an axis of length m."""
    most = 0
    for s in range(m - p + 1):
        hits = sum(1 for c in range(m - k + 1) if c <= s + p - 1 and c + k - 1 >= s)
        most = max(most, hits)
    return most


def overlap_bound_reference(n: int, adv: int, total: int, replace: bool, threshold: float) -> int:
    """The least t with P(X <= t) >= threshold, X the crops among n drawn that overlap the patch."""
    cdf = Fraction(0)
    for t in range(n + 1):
        if replace:
            p = Fraction(adv / total)  # the float probability n_adv / n_all, exactly as the runtime holds it
            cdf += math.comb(n, t) * p ** t * (1 - p) ** (n - t)
        else:
            cdf += Fraction(math.comb(adv, t) * math.comb(total - adv, n - t), math.comb(total, n))
        if float(cdf) >= threshold:
            return t
    return n


def near_ties_reference(logits: np.ndarray, tolerance: float) -> int:
    """How many crops of one frame (n, C) have their top two logits within ``tolerance``."""
    count = 0
    for row in logits:
        first = second = -math.inf
        for v in row:
            if v > first:
                first, second = v, first
            elif v > second:
                second = v
        count += int(first - second <= tolerance)
    return count


def certify_votes_reference(votes: list[int], input_hw: tuple[int, int], crop_hw: tuple[int, int], threat: Threat,
                            replace: bool, threshold: float, exhaustive: bool, uncertain: int = 0) -> Certificate:
    """One frame's certificate from its votes per class (``sum(votes)`` crops), ``uncertain`` of which count as
    changed whatever the patch (near ties on an unverified backend)."""
    n1 = n2 = -1
    for v in votes:
        if v > n1:
            n1, n2 = v, n1
        elif v > n2:
            n2 = v
    gap = n1 - max(n2, 0) - 2 * uncertain
    total = (input_hw[0] - crop_hw[0] + 1) * (input_hw[1] - crop_hw[1] + 1)
    per_rect = {}
    for rect in threat.rects:
        adv = axis_overlaps(input_hw[0], crop_hw[0], rect[0]) * axis_overlaps(input_hw[1], crop_hw[1], rect[1])
        t = adv if exhaustive else overlap_bound_reference(sum(votes), adv, total, replace, threshold)
        per_rect[rect_key(rect)] = RectCert(gap - 2 * t > 0, float(gap - 2 * t))
    return Certificate.from_rects(str(threat), per_rect, kind="recovery" if exhaustive else "probabilistic")


def certify_reference(logits: np.ndarray, input_hw: tuple[int, int], crop_hw: tuple[int, int], threat: Threat,
                      replace: bool, threshold: float, exhaustive: bool, tolerance: float | None = None) -> Certificate:
    """One frame's certificate from its crop logits (n, C); with a ``tolerance`` (an unverified backend), its
    near ties count as changed crops."""
    uncertain = 0 if tolerance is None else near_ties_reference(logits, tolerance)
    return certify_votes_reference(votes_reference(logits), input_hw, crop_hw, threat, replace, threshold,
                                   exhaustive, uncertain)


@plain_reference()
def reference(certifier: CroppingCertifier, frames: np.ndarray) -> list[Certificate]:
    """Randomized cropping's certificates from the votes (and near ties) of the certifier's crops, looping over
    classes, patch and crop positions, and the terms of the overlap tail in exact fractions."""
    features = certifier.infer(certifier.prepare(frames))
    o = certifier.options
    out = []
    for i, row in enumerate(features.votes):
        uncertain = 0 if features.near is None else sum(int(v) for v in features.near[i])
        out.append(certify_votes_reference([int(v) for v in row], certifier.input_hw, certifier.crop_hw,
                                           certifier.threat, o.replace, o.threshold, o.exhaustive, uncertain))
    return out
