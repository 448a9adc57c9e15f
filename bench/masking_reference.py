"""Plain reference for PatchGuard robust masking with per-class masking, written with loops.

Every patch location of every rectangle gives a window (a boolean (H', W') mask built cell by cell from the
receptive-field formula); the detection set is all of them. Loops over classes, windows and locations; numpy
only adds up masked cells. The bounds are the ones derived in ``certinfer.runtime.defenses.masking``:

* wrong class c: ``O_c + min(hi |w|, T O_c / (1 - T))`` (T < 1) or ``O_c + hi |w|`` (T = 1);
* true class y: ``O_y - max_{w'} sum(u_y on w' minus w)`` (T < 1) or ``O_y + lo |w|`` (T = 1);

``O_c`` being class c's evidence outside the attacker's window w. Margins come out in the units of
``masking.certify`` so certificates compare number for number (float sums in another order: within 1e-9).
``certinfer bench latency`` times this against the summed-area-table version.
"""

from __future__ import annotations

import math

import numpy as np

from certinfer.bench.bagcert_reference import affected_set, locations
from certinfer.bench.reference import plain_reference
from certinfer.runtime.defenses.masking import MaskingCertifier, MaskingOptions
from certinfer.runtime.geometry import Geometry
from certinfer.runtime.verdict import Certificate, RectCert
from certinfer.threat import Threat, rect_key


def all_windows(geometry: Geometry, rects) -> list[np.ndarray]:
    """Every window a patch can affect: one boolean mask per location of every rectangle."""
    return [affected_set(geometry, r, loc) for r in rects for loc in locations(geometry, r)]


def evidence_reference(u: np.ndarray, geometry: Geometry, rects, threshold: float) -> np.ndarray:
    """Per-class masking on clipped features ``u`` (H', W', C): each class's evidence after masking."""
    detect = all_windows(geometry, rects)
    evidence = []
    for c in range(u.shape[-1]):
        total = u[..., c].sum()
        top = max(u[..., c][w].sum() for w in detect)
        evidence.append(total - top if threshold < 1 and top > threshold * total else total)
    return np.array(evidence)


def rect_margin_reference(u: np.ndarray, label: int, geometry: Geometry, rect, rects, agg: MaskingOptions) -> float:
    lo, hi = agg.attack_range()
    T = agg.threshold
    detect = all_windows(geometry, rects)
    worst = math.inf
    for loc in locations(geometry, rect):
        w = affected_set(geometry, rect, loc)
        size = int(w.sum())
        outside = [u[..., c][~w].sum() for c in range(u.shape[-1])]
        if T >= 1:
            lower = outside[label] + lo * size
        else:
            lower = outside[label] - max(u[..., label][d & ~w].sum() for d in detect)
        for c in range(u.shape[-1]):
            if c == label:
                continue
            gain = hi * size if size else 0.0
            if T < 1:
                gain = min(gain, T * outside[c] / (1 - T))
            worst = min(worst, lower - (outside[c] + gain))
    return worst


def certify_reference(local_logits: np.ndarray, label: int, geometry: Geometry, threat: Threat,
                      agg: MaskingOptions) -> Certificate:
    u = agg.features(local_logits)
    threat = threat.bind(geometry.input_hw)
    tol = 1e-9 * (1.0 + np.abs(u).sum())
    margins = {rect_key(r): rect_margin_reference(u, label, geometry, r, threat.rects, agg) for r in threat.rects}
    return Certificate.from_rects(str(threat), {k: RectCert(bool(m > tol), m) for k, m in margins.items()})


@plain_reference(margin_rtol=1e-9)
def reference(certifier: MaskingCertifier, frames: np.ndarray) -> list[Certificate]:
    """PatchGuard's certificates, looping over locations, windows and classes on the certifier's local features."""
    local = certifier.infer(certifier.prepare(frames))
    options, g = certifier.options, certifier.geometry
    out = []
    for z in local:
        label = int(np.argmax(evidence_reference(options.features(z), g, certifier.threat.rects, options.threshold)))
        out.append(certify_reference(z, label, g, certifier.threat, options))
    return out
