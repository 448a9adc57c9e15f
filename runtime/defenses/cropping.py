"""Randomized cropping (Lin et al., ICLR 2021 submission): majority vote of a crop classifier over random crops.

For each frame the runtime draws ``n`` crop locations (top-left corners of a ``ch x cw`` crop fully inside the
model input) uniformly, with or without replacement, cuts every crop of a batch of frames with one gather,
classifies them in one batched engine call and takes the majority vote. A patch can change only the crops it
overlaps.

Overlap (Eq. 2 to 4). Per axis, a crop of side k at c and a patch of side p at s overlap when
``c <= s + p - 1`` and ``c + k - 1 >= s``; the patch position that overlaps the most crop positions gives
``n_adv = min(p + k - 1, m - k + 1)`` per axis (computed here by direct maximisation over s), and
``n_all = (m - k + 1)`` per axis; rows and columns multiply.

Certificate (Eq. 5 and 6, with ties as flips). With n1 votes for the label and n2 for the runner-up, a patch
that changes m crop predictions leaves at least n1 - m for the label and at most n2 + m for any rival; the
rival ties or wins once ``m >= (n1 - n2) / 2``. The runtime's argmax may resolve a tie in the rival's favour
(and an attacker picks the rival), so a tie is a flip: the patch must overlap ``need = ceil((n1 - n2) / 2)``
crops, one fewer than the paper's ``floor((n1 - n2) / 2) + 1`` when n1 - n2 is even. ``p_c`` is the
probability that fewer than ``need`` drawn crops overlap the worst-placed patch: a binomial tail with
replacement, the exact hypergeometric tail without (Appendix C, summed exactly rather than bounded per draw).

Exhaustive mode classifies every crop location once: no randomness, and a deterministic ``recovery``
certificate: the vote gap must exceed twice the most crop locations one patch overlaps (ties as flips).

Backends. A crop's prediction must not depend on the rest of its batch: the frame is certified in one batch and
a patched frame's crops run in another. The export checks this bit for bit on onnxruntime CPU and lists the
backend in ``probe.exact_backends``. On any other fp32 backend (torch's kernels round differently at other
batch sizes), a crop whose top two logits lie within ``tolerance`` (``defense.params.tolerance``, logit
units) of each other could vote differently in another batch, so it counts as a crop the patch changes: a frame
with ``u`` such crops is certified when the vote gap exceeds ``2 (t + u)``. That holds where the backend's
outputs move by less than half the tolerance between batch sizes, which ``certinfer inspect --probe`` checks.
Engines below fp32 round far more than the band allows: their certificates are withdrawn.

The probabilistic statement holds only against an attacker who cannot predict the crops: locations come from
numpy's default generator seeded from the OS's entropy. A fixed seed (:meth:`Certifier.seeded`) is for tests and
reproducible benchmarks only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from certinfer.threat import Rect, Threat, rect_key
from certinfer.runtime.certifier import EXACT_PRECISION, TIE_TOLERANCE, Certifier, Decision, Options
from certinfer.runtime.verdict import Certificate, RectCert

MODES = ("sample", "exhaustive")
DEFAULT_THRESHOLD = 0.95


class WithoutReplacement(float):
    """The per-crop overlap probability ``adv / total`` of a draw without replacement, carrying the counts.

    It is a float (the marginal probability of each drawn crop), and :func:`certificate` uses its counts for
    the exact hypergeometric tail.
    """

    adv: int
    total: int

    def __new__(cls, adv: int, total: int) -> WithoutReplacement:
        if not 0 <= adv <= total or total < 1:
            raise ValueError(f"need 0 <= adv <= total, total >= 1; got adv={adv}, total={total}")
        p = super().__new__(cls, adv / total)
        p.adv, p.total = int(adv), int(total)
        return p


def _axis_overlap(m: int, k: int, p: int) -> int:
    """The most crop positions (side k, inside m) that one patch position (side p) overlaps on one axis."""
    if not (1 <= k <= m and 1 <= p <= m):
        raise ValueError(f"crop side {k} and patch side {p} must lie in [1, {m}]")
    s = np.arange(m - p + 1)
    return int((np.minimum(s + p - 1, m - k) - np.maximum(s - k + 1, 0) + 1).max())


def crop_locations(input_hw: tuple[int, int], crop_hw: tuple[int, int]) -> int:
    """n_all (Eq. 3): the number of crop positions fully inside the input."""
    (m1, m2), (k1, k2) = input_hw, crop_hw
    if not (1 <= k1 <= m1 and 1 <= k2 <= m2):
        raise ValueError(f"crop {k1}x{k2} does not fit the {m1}x{m2} input")
    return (m1 - k1 + 1) * (m2 - k2 + 1)


def max_overlapped(input_hw: tuple[int, int], crop_hw: tuple[int, int], rect: Rect | Threat) -> int:
    """n_adv (Eq. 2): the most crop positions one patch overlaps, over its positions (and a threat's rectangles)."""
    rects = rect.rects if isinstance(rect, Threat) else (rect,)
    return max(_axis_overlap(input_hw[0], crop_hw[0], r[0]) * _axis_overlap(input_hw[1], crop_hw[1], r[1])
               for r in rects)


def overlap_probability(input_hw: tuple[int, int], crop_hw: tuple[int, int], rect: Rect | Threat,
                        replace: bool = True) -> float:
    """p_a (Eq. 4) at the worst patch position (a threat: its worst rectangle; ``rot45:`` is its bounding box).

    Each drawn crop overlaps the patch with probability n_adv / n_all, with or without replacement. Without
    replacement the result is a :class:`WithoutReplacement` that also carries the counts, so
    :func:`certificate` can sum the exact hypergeometric tail.
    """
    adv, total = max_overlapped(input_hw, crop_hw, rect), crop_locations(input_hw, crop_hw)
    return adv / total if replace else WithoutReplacement(adv, total)


def needed_overlaps(votes: np.ndarray) -> np.ndarray:
    """ceil((n1 - n2) / 2) per row of vote counts (..., C): the crops a patch must change to tie or win."""
    top2 = -np.sort(-np.asarray(votes), axis=-1)[..., :2]
    gap = top2[..., 0] - (top2[..., 1] if top2.shape[-1] > 1 else 0)
    return (gap + 1) // 2


@lru_cache(maxsize=256)
def _binomial_cdf(n: int, p: float) -> np.ndarray:
    """P(X <= j) for X ~ Binomial(n, p), j = 0..n: exact integer sums of the float p, correctly rounded."""
    a, d = p.as_integer_ratio()
    b = d - a
    terms = [math.comb(n, i) * a ** i * b ** (n - i) for i in range(n + 1)]
    denom = d ** n
    return np.array([c / denom for c in np.cumsum(np.array(terms, dtype=object))], dtype=np.float64)


@lru_cache(maxsize=256)
def _hypergeometric_cdf(n: int, adv: int, total: int) -> np.ndarray:
    """P(X <= j) for X overlapping crops among n drawn without replacement from ``total`` (``adv`` overlap)."""
    if n > total:
        raise ValueError(f"cannot draw {n} crops without replacement from {total} locations")
    terms = [math.comb(adv, i) * math.comb(total - adv, n - i) for i in range(n + 1)]
    denom = math.comb(total, n)
    return np.array([c / denom for c in np.cumsum(np.array(terms, dtype=object))], dtype=np.float64)


def _cdf(n: int, p_overlap: float) -> np.ndarray:
    if isinstance(p_overlap, WithoutReplacement):
        return _hypergeometric_cdf(n, p_overlap.adv, p_overlap.total)
    if not 0.0 <= p_overlap <= 1.0:
        raise ValueError(f"overlap probability must lie in [0, 1], got {p_overlap}")
    return _binomial_cdf(n, float(p_overlap))


def certificate(votes: np.ndarray, n: int, p_overlap: float, uncertain: np.ndarray | int = 0) -> np.ndarray:
    """p_c (Eq. 6, ties as flips): the probability that the patch overlaps fewer than ceil((n1 - n2) / 2) crops.

    Why ties are flips: a patch that changes m crop predictions leaves n1 - m for the label and gives a rival up
    to n2 + m; at m = ceil((n1 - n2) / 2) the rival ties or wins, and a tie may be resolved in its favour. The
    paper's floor((n1 - n2) / 2) + 1 asks for one crop more when n1 - n2 is even, i.e. treats a tie as safe.

    ``votes``: counts per class (C,) or (N, C) summing to ``n``; ``p_overlap`` from :func:`overlap_probability`
    (a :class:`WithoutReplacement` for the exact hypergeometric tail); ``uncertain``: crops per frame that may
    vote differently whatever the patch (near ties on an unverified backend), which the patch needs no longer
    overlap. Returns a float or an (N,) array.
    """
    v = np.asarray(votes)
    if v.ndim not in (1, 2) or np.any(v.sum(axis=-1) != n):
        raise ValueError(f"votes must be (C,) or (N, C) counts summing to n={n}")
    need = np.maximum(needed_overlaps(v) - np.asarray(uncertain), 0)
    cdf = np.concatenate([[0.0], _cdf(int(n), p_overlap)])  # cdf[need] = P(X <= need - 1)
    p = cdf[np.minimum(need, n + 1)]
    return float(p) if v.ndim == 1 else p


def overlap_bound(n: int, p_overlap: float, threshold: float) -> int:
    """min{t : P(X <= t) >= threshold}: with probability >= threshold the patch overlaps at most t of n crops.

    p_c = P(X <= need - 1) >= threshold exactly when need > t, i.e. when the vote gap exceeds 2 t.
    """
    return int(np.flatnonzero(_cdf(int(n), p_overlap) >= threshold)[0])


def _certs(gap: np.ndarray, bound: dict[str, int], p: dict[str, np.ndarray] | None, threat: str,
           kind: str) -> list[Certificate]:
    """Certified for a rectangle when the vote gap exceeds twice its overlap bound; margin = that slack in votes."""
    certs = []
    for i in range(len(gap)):
        per_rect = {k: RectCert(bool(gap[i] - 2 * t > 0), float(gap[i] - 2 * t)) for k, t in bound.items()}
        pc = None if p is None else float(min(v[i] for v in p.values()))
        certs.append(Certificate.from_rects(threat, per_rect, kind=kind, p=pc))
    return certs


def vote_certificates(votes: np.ndarray, input_hw: tuple[int, int], crop_hw: tuple[int, int], threat: Threat,
                      replace: bool = True, threshold: float = DEFAULT_THRESHOLD, exhaustive: bool = False,
                      uncertain: np.ndarray | None = None) -> list[Certificate]:
    """Certificates for vote counts (N, C): ``probabilistic`` with p = min over rectangles of p_c, or (exhaustive)
    ``recovery``. Per rectangle, ``margin`` is the vote gap minus twice the overlap bound (> 0 exactly when
    certified: p_c >= threshold via :func:`overlap_bound`, or the exhaustive gap > 2 n_adv), and minus twice the
    ``uncertain`` crops (N,) of each frame, which count as changed whatever the patch."""
    votes = np.asarray(votes)
    n = int(votes[0].sum())
    u = np.zeros(len(votes), np.int64) if uncertain is None else np.asarray(uncertain, np.int64)
    top2 = -np.sort(-votes, axis=-1)[:, :2]
    gap = top2[:, 0] - top2[:, 1] - 2 * u
    rects = {rect_key(r): r for r in threat.rects}
    if exhaustive:
        bound = {k: max_overlapped(input_hw, crop_hw, r) for k, r in rects.items()}
        return _certs(gap, bound, None, str(threat), "recovery")
    probs = {k: overlap_probability(input_hw, crop_hw, r, replace) for k, r in rects.items()}
    bound = {k: overlap_bound(n, pa, threshold) for k, pa in probs.items()}
    p = {k: certificate(votes, n, pa, u) for k, pa in probs.items()}
    return _certs(gap, bound, p, str(threat), "probabilistic")


def draw_locations(rng: np.random.Generator, frames: int, n: int, total: int, replace: bool) -> np.ndarray:
    """(frames, n) flat crop-location indices in [0, total), uniform, with or without replacement per frame."""
    if replace:
        return rng.integers(0, total, size=(frames, n))
    if n > total:
        raise ValueError(f"cannot draw {n} crops without replacement from {total} locations")
    return np.argsort(rng.random((frames, total)), axis=1)[:, :n]


def cut(x: np.ndarray, crop_hw: tuple[int, int], flat: np.ndarray) -> np.ndarray:
    """Engine input for every crop of every frame, one gather: x (N, 3, H, W), flat (N, n) -> (N * n, 5, ch, cw).

    Channels 0-2: the normalized crop; 3 and 4: its top and left offset in pixels, as constant planes (the
    engine graph takes one input; its positional encoding reads the location from these planes).
    """
    n_frames, n = flat.shape
    width = x.shape[3] - crop_hw[1] + 1
    top, left = np.divmod(flat, width)
    windows = sliding_window_view(x, crop_hw, axis=(2, 3))  # (N, 3, H', W', ch, cw), a view
    out = np.empty((n_frames, n, 5, *crop_hw), dtype=np.float32)
    out[:, :, :3] = windows[np.arange(n_frames)[:, None], :, top, left]
    out[:, :, 3] = top[..., None, None]
    out[:, :, 4] = left[..., None, None]
    return out.reshape(n_frames * n, 5, *crop_hw)


def near_ties(logits: np.ndarray, tolerance: float) -> np.ndarray:
    """(..., C) logits -> (...) bool: the top two within ``tolerance`` (exact ties included)."""
    top2 = -np.partition(-logits, 1, axis=-1)[..., :2]
    return top2[..., 0] - top2[..., 1] <= tolerance


def count_votes(predictions: np.ndarray, classes: int) -> np.ndarray:
    """(N, n) crop labels -> (N, C) vote counts."""
    n_frames = len(predictions)
    offset = (np.arange(n_frames)[:, None] * classes + predictions).ravel()
    return np.bincount(offset, minlength=n_frames * classes).reshape(n_frames, classes)


@dataclass(frozen=True)
class CroppingOptions(Options):
    """``crops``: crops drawn per frame (ignored when ``exhaustive``: every location once), ``replace``: draw with
    replacement, ``threshold``: certified when p_c >= threshold, ``exhaustive``: every crop location once and a
    deterministic ``recovery`` certificate. Bundles say ``mode: "exhaustive"`` for the last."""

    INFER = ("crops", "replace", "exhaustive")

    crops: int = 128
    threshold: float = DEFAULT_THRESHOLD
    replace: bool = True
    exhaustive: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.crops, bool) or int(self.crops) != self.crops or self.crops < 1:
            raise ValueError(f"crops must be a positive integer, got {self.crops!r}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold}")
        object.__setattr__(self, "crops", int(self.crops))
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "replace", bool(self.replace))
        object.__setattr__(self, "exhaustive", bool(self.exhaustive))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CroppingOptions:
        mode = params.get("mode", "sample")
        if mode not in MODES:
            raise ValueError(f"cropping bundle: mode must be one of {MODES}, got {mode!r}")
        return cls(crops=params.get("crops", 128), threshold=params.get("threshold", DEFAULT_THRESHOLD),
                   replace=params.get("replace", True), exhaustive=mode == "exhaustive")


@dataclass(frozen=True)
class CropVotes:
    """A batch's inference: per-frame vote counts (N, C), the crop locations drawn (N, n), each crop's label (N, n),
    how they were drawn (the certificate must be the one for that draw) and, on a backend not verified
    batch-independent, which crops are near ties (N, n) (else None)."""

    votes: np.ndarray
    locations: np.ndarray
    predictions: np.ndarray
    replace: bool
    exhaustive: bool
    near: np.ndarray | None = None


class CroppingCertifier(Certifier):
    """Randomized cropping from a bundle's ``defense.params``: ``crop`` [ch, cw] and the :class:`CroppingOptions`.

    The engine is the crop classifier: (N, 5, ch, cw) float32 (see :func:`cut`) -> (N, C) logits. All crops of a
    batch of frames go to it in one call (chunked to its max batch); :meth:`infer` returns their votes
    (:class:`CropVotes`). Crop locations come from ``self.rng`` (OS entropy unless :meth:`seeded`).
    """

    name = "cropping"
    Options = CroppingOptions
    threat_in_features = False  # the threat enters only in decide

    def __init__(self, bundle, engines, threat: Threat, options: CroppingOptions | None = None):
        super().__init__(bundle, engines, threat, options)
        if "crop" not in self.params:
            raise ValueError("cropping bundle: defense.params.crop (the crop's [height, width]) is missing")
        self.crop_hw = tuple(int(v) for v in self.params["crop"])
        self.locations = crop_locations(self.input_hw, self.crop_hw)
        self.tolerance = float(self.params.get("tolerance", TIE_TOLERANCE))
        if not self.tolerance > 0:
            raise ValueError(f"cropping bundle: defense.params.tolerance must be positive, got {self.tolerance}")
        self._validate()

    @property
    def kind(self) -> str:
        return "recovery" if self.options.exhaustive else "probabilistic"

    @property
    def randomized(self) -> bool:
        """Sampled crops are random draws; exhaustive mode takes every location once, in order."""
        return not self.options.exhaustive

    def _validate(self) -> None:
        o = self.options
        if not (o.exhaustive or o.replace or o.crops <= self.locations):
            raise ValueError(f"cropping: {o.crops} crops without replacement from {self.locations} locations")

    def output_shapes(self, role: str = "model") -> tuple[tuple[int, ...], ...]:
        return ((len(self.classes),),)

    @property
    def needs_exact(self) -> bool:
        """An engine below fp32 gives no certificates: the near-tie band is sized for fp32 rounding."""
        return any(getattr(e, "precision", EXACT_PRECISION) != EXACT_PRECISION for e in self.engines.values())

    def batch_atol(self) -> float:
        """Bit for bit on a verified backend; elsewhere half the near-tie band (a gap moves by twice that)."""
        return 0.0 if self.trusted else self.tolerance / 2

    def draw(self, frames: int) -> np.ndarray:
        """(frames, n) flat crop locations for one call (every location once, in order, when exhaustive)."""
        o = self.options
        if o.exhaustive:
            return np.broadcast_to(np.arange(self.locations), (frames, self.locations))
        with self._rng_lock:
            return draw_locations(self.rng, frames, o.crops, self.locations, o.replace)

    def infer(self, x: np.ndarray) -> CropVotes:
        flat = self.draw(len(x))
        out = self.run_engine(cut(x, self.crop_hw, flat))
        logits = out[0] if isinstance(out, tuple) else out
        predictions = logits.argmax(axis=-1).reshape(flat.shape)
        votes = count_votes(predictions, len(self.classes))
        near = None if self.trusted else near_ties(logits, self.tolerance).reshape(flat.shape)
        return CropVotes(votes, flat, predictions, self.options.replace, self.options.exhaustive, near)

    def decide(self, features: CropVotes, options: CroppingOptions) -> list[Decision]:
        """Majority vote (argmax: the lowest class index wins a tie) and its certificate."""
        if features.exhaustive != options.exhaustive or not options.exhaustive and features.replace != options.replace:
            raise ValueError(f"votes drawn with replace={features.replace}, exhaustive={features.exhaustive} cannot "
                             f"be certified as replace={options.replace}, exhaustive={options.exhaustive}")
        votes = features.votes
        uncertain = None if features.near is None else features.near.sum(axis=1)
        certs = vote_certificates(votes, self.input_hw, self.crop_hw, self.threat, options.replace,
                                  options.threshold, options.exhaustive, uncertain)
        labels = votes.argmax(axis=-1)
        return [Decision(label=int(labels[i]), certificate=certs[i], scores=votes[i].astype(float).tolist())
                for i in range(len(votes))]
