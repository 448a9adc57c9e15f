"""Plain reference for double masking (PatchCleanser, Xiang et al. 2022), written from the paper with loops.

PatchCleanser's own way: one masked copy per classifier call. For every frame the full two-mask prediction map
is computed (mask i and mask j for every i <= j; i == j is the one-mask prediction), then

* inference (the paper's Algorithm 1 on the map): if every one-mask prediction agrees, that label (case 1);
  else, for each mask whose one-mask prediction differs from the majority, in mask order: if every two-mask
  prediction in its row equals its own, its label (case 2); else the majority (case 3). The majority is taken
  as in the authors' released code (``np.unique`` counts, argsort, last taken), with a stable sort: a tie goes
  to the largest label;
* certification: certified for the inferred label y when every prediction of the map is y, each with a strict
  margin: ``logit[y] - max_{c != y} logit[c] > 0`` (a tie is a flip), or above the bundle's tolerance on a
  backend its export did not verify batch-independent. The margin is the smallest such gap over
  the copies the certificate reads: the one-mask copies, and when they all agree with a strict margin the pairs
  in check order (nearest the centre first: by the sum of both masks' squared centre offsets in half cells, ties
  in row-major order) up to the first that fails, or all of them.

Masks are the certifier's (pixel masks, or feature masks on the front part's map, which runs once per frame);
each copy is built pixel by pixel (cell by cell) from its two masks. ``certinfer.bench.doublemask_speed`` times
this against the batched runtime.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from certinfer.bench.reference import plain_reference
from certinfer.runtime.defenses.doublemask import DoubleMaskCertifier
from certinfer.runtime.verdict import Certificate, RectCert

Run = Callable[[np.ndarray], np.ndarray]  # one (C, H, W) copy -> (classes,) logits


def masked_copy(x: np.ndarray, first: np.ndarray, second: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``x`` (C, H, W) with every position inside either mask set to ``value`` (scalar or per channel)."""
    out = x.copy()
    v = np.broadcast_to(value, (x.shape[0],))
    for r in range(x.shape[1]):
        for c in range(x.shape[2]):
            if first[r, c] or second[r, c]:
                out[:, r, c] = v
    return out


def prediction_map(run: Run, x: np.ndarray, masks: np.ndarray, value: np.ndarray) -> np.ndarray:
    """(K, K, classes) logits: entry (i, j) = (j, i) is ``x`` under masks i and j, one call per copy."""
    k = len(masks)
    logits = None
    for i in range(k):
        for j in range(i, k):
            out = run(masked_copy(x, masks[i], masks[j], value))
            if logits is None:
                logits = np.zeros((k, k, len(out)), dtype=np.float32)
            logits[i, j] = logits[j, i] = out
    return logits


def majority(preds: list[int]) -> int:
    labels, counts = np.unique(preds, return_counts=True)
    return int(labels[np.argsort(counts, kind="stable")][-1])


def double_masking(preds: np.ndarray) -> tuple[int, int]:
    """Algorithm 1 on a (K, K) prediction map: ``(label, case)``."""
    one = [int(preds[i, i]) for i in range(len(preds))]
    top = majority(one)
    if all(p == top for p in one):
        return top, 1
    for i, dis in enumerate(one):
        if dis != top and all(int(preds[i, j]) == dis for j in range(len(preds))):
            return dis, 2
    return top, 3


def gap(logits: np.ndarray, label: int) -> float:
    return float(logits[label]) - max(float(v) for c, v in enumerate(logits) if c != label)


def centre_offset(mask: np.ndarray) -> int:
    """Squared distance, in half cells, from the centre of the mask's bounding box to the centre of the map."""
    rows = [r for r in range(mask.shape[0]) if mask[r].any()]
    cols = [c for c in range(mask.shape[1]) if mask[:, c].any()]
    dy = rows[0] + rows[-1] - (mask.shape[0] - 1)
    dx = cols[0] + cols[-1] - (mask.shape[1] - 1)
    return dy * dy + dx * dx


def check_order(masks: np.ndarray) -> list[tuple[int, int]]:
    """The pairs ``(i, j)``, ``i < j``, nearest the centre first; Python's sort is stable: ties stay row-major."""
    offset = [centre_offset(m) for m in masks]
    pairs = [(i, j) for i in range(len(masks)) for j in range(i + 1, len(masks))]
    return sorted(pairs, key=lambda p: offset[p[0]] + offset[p[1]])


def decide(logits: np.ndarray, order: list[tuple[int, int]],
           required: float = 0.0) -> tuple[int, int, bool, float]:
    """``(label, case, certified, margin)`` from a (K, K, classes) logit map and the pairs' check order; certified
    needs a margin above ``required``."""
    k = len(logits)
    preds = logits.argmax(axis=-1)
    label, case = double_masking(preds)
    margin = min(gap(logits[i, i], label) for i in range(k))
    if case == 1 and margin > 0:
        for i, j in order:
            margin = min(margin, gap(logits[i, j], label))
            if margin <= 0:
                break
    certified = all(int(preds[i, j]) == label for i in range(k) for j in range(k)) and margin > required
    return label, case, certified, margin


def reference_decisions(certifier: DoubleMaskCertifier, frames: np.ndarray) -> list[tuple[int, int, Certificate]]:
    """``(label, case, certificate)`` per frame, one engine call per masked copy."""
    x = certifier.prepare(frames)
    value = np.asarray(certifier.mask_value, dtype=np.float32)
    role = "model" if certifier.space == "pixel" else "back"

    def run(copy: np.ndarray) -> np.ndarray:
        out = certifier.run_engine(copy[None], role=role)
        return (out[0] if isinstance(out, tuple) else out)[0]

    results = []
    for frame in x:
        base = frame
        if certifier.space == "feature":
            out = certifier.run_engine(frame[None], role="front")
            base = (out[0] if isinstance(out, tuple) else out)[0]
        logits = prediction_map(run, base, certifier.masks, value)
        label, case, certified, margin = decide(logits, check_order(certifier.masks), certifier.required_margin)
        rects = {key: RectCert(certified, margin + 0.0) for key in certifier.threat.keys}
        results.append((label, case, Certificate.from_rects(str(certifier.threat), rects)))
    return results


@plain_reference(margin_rtol=1e-4)  # one copy per engine call: margins round differently in the last bits
def reference(certifier: DoubleMaskCertifier, frames: np.ndarray) -> list[Certificate]:
    """The certificates of ``frames`` computed the plain way (see the module docstring)."""
    return [cert for _, _, cert in reference_decisions(certifier, frames)]
