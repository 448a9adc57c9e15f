"""PatchGuard robust masking (Xiang et al. 2021); Clipped BagNet and De-randomized Smoothing as settings.

Local features ``u`` (H', W', C) come from a small-receptive-field model (BagNet local logits) or an
ablation ensemble (one base-classifier output per kept band or block). A patch can change only the cells
of one window ``w = affected(rect, location)``; the detection set ``W`` is every such window of every
rectangle of the threat.

Aggregation (per-class masking). Clip ``u`` to [lo, hi] (features: logits, softmax confidence or one-hot
prediction). For each class c: ``S_c`` = total evidence, ``M_c`` = its largest window sum over ``W``;
when ``M_c > T * S_c`` that window is masked, so the class keeps ``e_c = S_c - M_c``, else ``e_c = S_c``.
The prediction is argmax_c e_c. (Algorithm 1 read literally masks ONE window, chosen on the undefended
prediction's evidence, for all classes; an attacker who keeps the undefended prediction on the true class
then makes it mask benign true-class evidence, and Algorithm 2 does not cover that. See
tests/test_masking_math.py for an explicit counterexample.)

Bounds (Algorithm 2's cases, for per-class masking). Let the attacker own window w; ``O_c`` = class c's
evidence outside w (fixed), ``A`` = what it puts inside w, ``lo * |w| <= A <= hi * |w|``.
- Wrong class c: if masked, ``e_c = O_c + A - M'_c <= O_c`` because M'_c >= A (w is in W). If not,
  ``A <= M'_c <= T (O_c + A)`` so ``A <= T O_c / (1 - T)``. Hence ``e_c <= O_c + min(hi |w|, T O_c / (1 - T))``;
  with T >= 1 nothing is masked and ``e_c <= O_c + hi |w|``.
- True class y: if not masked ``e_y >= O_y + lo |w|``; if masked, M'_y <= max_{w' in W} u_y(w' \\ w) + A, so
  ``e_y >= O_y - R_y(w)`` with R_y(w) the largest window's evidence left outside w. (T >= 1: only the first.)
Certified for a rectangle when, at every location, the true class's lower bound beats every other class's
upper bound strictly (ties are flips). Masking (T < 1) needs lo >= 0, as the paper's clipping does.

Special cases: CBN is feature logits, clip "tanh" (tanh(0.05 u - 1), range (-1, 1)), T = 1: certified when
O_y - max O_c > 2 |w|. DRS is feature prediction (one-hot votes, abstaining below a confidence), clip
[0, 1], T = 1: O_y > O_c + |w| at every window, which implies DRS's count gap > 2k rule and is never looser.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from certinfer.threat import Threat, rect_key
from certinfer.runtime import ablation, sat
from certinfer.runtime.certifier import Certifier, Decision, Options
from certinfer.runtime.geometry import Geometry
from certinfer.runtime.verdict import Certificate, RectCert

INF = math.inf
FEATURES = ("logits", "confidence", "prediction")
TANH = "tanh"  # CBN's clipping function tanh(0.05 u - 1)
_FRAMES = 16  # frames certified per pass
_CANDIDATES = 8  # attacker windows per frame whose remaining true-class evidence is computed exactly first
_CHUNK = 1 << 18  # elements of the (n, windows, windows) remaining-evidence array per pass (stays in cache)


@dataclass(frozen=True)
class MaskingOptions(Options):
    """How local logits become clipped features and how masking treats them.

    ``feature``: ``logits``, ``confidence`` (softmax) or ``prediction`` (one-hot votes); ``threshold`` T: mask a
    class's top window when it holds more than T of its evidence; ``clip``: (lo, hi) or ``"tanh"`` (CBN);
    ``abstain``: with the prediction feature, a local prediction below this softmax confidence votes for nothing.
    """

    feature: str = "logits"
    threshold: float = 0.0
    clip: tuple[float, float] | str = (0.0, INF)
    abstain: float = 0.0

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {self.feature!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold T must be in [0, 1], got {self.threshold}")
        if self.clip != TANH:
            lo, hi = (float(v) for v in self.clip)
            if not lo <= hi:
                raise ValueError(f"clip bounds must satisfy lo <= hi, got {self.clip}")
            object.__setattr__(self, "clip", (lo, hi))
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "abstain", float(self.abstain))
        if self.threshold < 1 and self.attack_range()[0] < 0:
            raise ValueError("masking (T < 1) needs non-negative features: clip's lower bound must be >= 0")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> MaskingOptions:
        """Options from a bundle's ``defense.params`` (or a :data:`VARIANTS` entry): JSON ``clip`` is
        ``[lo, hi]`` with ``null`` for an unbounded top, or ``"tanh"``."""
        clip = params.get("clip", [0.0, None])
        clip = TANH if clip == TANH else (float(clip[0]), INF if clip[1] is None else float(clip[1]))
        return cls(feature=params.get("feature", "logits"), threshold=float(params.get("threshold", 0.0)),
                   clip=clip, abstain=float(params.get("abstain", 0.0)))

    def attack_range(self) -> tuple[float, float]:
        """The values an attacker can give one feature cell."""
        if self.clip == TANH:
            return -1.0, 1.0
        lo, hi = self.clip
        if self.feature == "logits":
            return lo, hi
        return min(max(lo, 0.0), 1.0), max(min(hi, 1.0), 0.0)  # confidences and votes live in [0, 1]

    def features(self, local_logits: np.ndarray) -> np.ndarray:
        """Clipped features in float64, same shape as the logits (..., C)."""
        z = np.asarray(local_logits, dtype=np.float64)
        if self.feature == "logits":
            return np.tanh(0.05 * z - 1.0) if self.clip == TANH else np.clip(z, *self.clip)
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        if self.feature == "prediction":
            top = p.argmax(axis=-1)[..., None]
            vote = np.take_along_axis(p, top, axis=-1) >= self.abstain
            p = (np.arange(p.shape[-1]) == top) & vote
        return np.clip(p.astype(np.float64), *self.attack_range())


def _unique(ranges: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    pairs = np.unique(np.stack(ranges, axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def windows(geometry: Geometry, rect: tuple[int, int]) -> tuple[tuple, tuple]:
    """The distinct windows one rectangle can affect, as a grid of unique (rows, cols) half-open ranges."""
    rows, cols = geometry.affected_ranges(rect)
    return _unique(rows), _unique(cols)


def _batched(local_logits: np.ndarray) -> tuple[np.ndarray, bool]:
    u = np.asarray(local_logits)
    single = u.ndim == 3
    u = u[None] if single else u
    if u.ndim != 4:
        raise ValueError(f"local logits must be (H', W', C) or (N, H', W', C), got shape {np.shape(local_logits)}")
    return u, single


def _bind(threat: Threat, geometry: Geometry) -> Threat:
    return threat if threat.input_hw == tuple(geometry.input_hw) else threat.bind(geometry.input_hw)


def evidence(u: np.ndarray, geometry: Geometry, threat: Threat, threshold: float) -> np.ndarray:
    """Per-class evidence after per-class masking, (N, C), from clipped features ``u`` (N, H', W', C)."""
    total = u.sum(axis=(1, 2))
    if threshold >= 1:
        return total
    t = sat.table(u)
    top = np.max([sat.window_sums(t, *windows(geometry, r)).max(axis=(1, 2)) for r in _bind(threat, geometry).rects],
                 axis=0)
    return total - np.where(top > threshold * total, top, 0.0)


def robust_predict(local_logits: np.ndarray, geometry: Geometry, threat: Threat, threshold: float = 0.0,
                   clip: tuple[float, float] | str = (0.0, INF), feature: str = "logits", abstain: float = 0.0):
    """Robust masking's label for local logits (H', W', C) -> int, or (N, H', W', C) -> (N,) array."""
    agg = MaskingOptions(feature, threshold, clip, abstain)
    z, single = _batched(local_logits)
    labels = evidence(agg.features(z), geometry, threat, threshold).argmax(axis=-1)
    return int(labels[0]) if single else labels


def _remaining_max(ty: np.ndarray, attack: tuple, detect: list[tuple]) -> np.ndarray:
    """R_y(w): for each attacker window w, the most true-class evidence one detection window keeps outside w.

    ``ty`` is the true class's summed-area table (N, H'+1, W'+1); returns (N, Lr, Lc). Sums over w' and w
    intersected come from the table: rows first (N, Lr, Dr, W'+1), then columns.
    """
    (ar0, ar1), (ac0, ac1) = attack
    best = np.full((ty.shape[0], len(ar0), len(ac0)), -INF)
    for (dr0, dr1), (dc0, dc1) in detect:
        whole = sat.window_sums(ty[..., None], (dr0, dr1), (dc0, dc1))[..., 0]  # (N, Dr, Dc)
        i0 = np.maximum(ar0[:, None], dr0[None, :])  # (Lr, Dr): rows of w' inside w
        i1 = np.maximum(i0, np.minimum(ar1[:, None], dr1[None, :]))
        j0 = np.maximum(ac0[:, None], dc0[None, :])  # (Lc, Dc)
        j1 = np.maximum(j0, np.minimum(ac1[:, None], dc1[None, :]))
        per = max(1, _CHUNK // (i0.size * j0.size))
        for s in range(0, ty.shape[0], per):
            rows = ty[s:s + per, i1] - ty[s:s + per, i0]  # (n, Lr, Dr, W'+1)
            inside = rows[..., j1] - rows[..., j0]  # (n, Lr, Dr, Lc, Dc)
            kept = whole[s:s + per, None, :, None, :] - inside
            best[s:s + per] = np.maximum(best[s:s + per], kept.max(axis=(2, 4)))
    return best


def _remaining_at(ty: np.ndarray, attack: tuple, detect: list[tuple], li: np.ndarray, lj: np.ndarray) -> np.ndarray:
    """R_y(w) for chosen attacker windows only: ``li``, ``lj`` (N, K) index the attack's row and column ranges."""
    (ar0, ar1), (ac0, ac1) = attack
    n = np.arange(len(ty))[:, None, None, None]
    best = np.full(li.shape, -INF)
    for (dr0, dr1), (dc0, dc1) in detect:
        whole = sat.window_sums(ty[..., None], (dr0, dr1), (dc0, dc1))[..., 0]  # (N, Dr, Dc)
        i0 = np.maximum(ar0[li][..., None], dr0)  # (N, K, Dr)
        i1 = np.maximum(i0, np.minimum(ar1[li][..., None], dr1))[..., :, None]
        j0 = np.maximum(ac0[lj][..., None], dc0)  # (N, K, Dc)
        j1 = np.maximum(j0, np.minimum(ac1[lj][..., None], dc1))[..., None, :]
        i0, j0 = i0[..., :, None], j0[..., None, :]
        inside = ty[n, i1, j1] - ty[n, i0, j1] - ty[n, i1, j0] + ty[n, i0, j0]  # (N, K, Dr, Dc)
        best = np.maximum(best, (whole[:, None] - inside).max(axis=(2, 3)))
    return best


def _masked_margin(base: np.ndarray, ty: np.ndarray, attack: tuple, detect: list[tuple]) -> np.ndarray:
    """min over windows of ``base - R_y(w)``, exactly, computing R_y only where it can decide the minimum.

    R_y(w) <= M_y (the true class's largest window), so ``base - M_y`` bounds every window's value from below:
    the K windows lowest on that bound get R_y exactly; if the next bound is not below their minimum, no other
    window can be lower. Frames where it is fall back to every window.
    """
    n = len(ty)
    top = np.max([sat.window_sums(ty[..., None], *d)[..., 0].max(axis=(1, 2)) for d in detect], axis=0)
    cheap = (base - top[:, None, None]).reshape(n, -1)
    k = min(_CANDIDATES, cheap.shape[1])
    pick = np.argpartition(cheap, k - 1, axis=1)[:, :k]
    li, lj = np.unravel_index(pick, base.shape[1:])
    m = (np.take_along_axis(base.reshape(n, -1), pick, axis=1) - _remaining_at(ty, attack, detect, li, lj)).min(axis=1)
    if k < cheap.shape[1]:
        unsure = np.partition(cheap, k, axis=1)[:, k] < m
        if unsure.any():
            m[unsure] = (base[unsure] - _remaining_max(ty[unsure], attack, detect)).min(axis=(1, 2))
    return m


def _rect_margin(t: np.ndarray, total: np.ndarray, labels: np.ndarray, agg: MaskingOptions,
                 attack: tuple, detect: list[tuple]) -> np.ndarray:
    """min over the rectangle's windows of (true-class lower bound - best rival's upper bound), per sample."""
    lo, hi = agg.attack_range()
    T = agg.threshold
    outside = total[:, None, None, :] - sat.window_sums(t, *attack)  # (N, Lr, Lc, C)
    own = np.take_along_axis(outside, labels[:, None, None, None], axis=-1)[..., 0]
    outside[np.arange(len(labels)), ..., labels] = -INF
    rival = outside.max(axis=-1)  # the upper bound grows with O_c, so the rival with most evidence outside decides
    size = sat.window_sizes(*attack).astype(np.float64)
    gain = np.where(size > 0, INF, 0.0) if math.isinf(hi) else hi * size
    upper = rival + (gain if T >= 1 else np.minimum(gain, T * rival / (1 - T)))
    if T >= 1:
        return (own + lo * size - upper).min(axis=(1, 2))
    ty = np.take_along_axis(t, labels[:, None, None, None], axis=-1)[..., 0]
    return _masked_margin(own - upper, ty, attack, detect)


def certify(local_logits: np.ndarray, label, geometry: Geometry, threat: Threat, threshold: float = 0.0,
            clip: tuple[float, float] | str = (0.0, INF), feature: str = "logits",
            abstain: float = 0.0) -> Certificate | list[Certificate]:
    """Algorithm 2 for per-class masking: is ``label`` the robust prediction under every patch of ``threat``?"""
    agg = MaskingOptions(feature, threshold, clip, abstain)
    z, single = _batched(local_logits)
    return certify_features(agg.features(z), label, geometry, threat, agg, single)


def certify_features(u: np.ndarray, label, geometry: Geometry, threat: Threat, agg: MaskingOptions,
                     single: bool = False) -> Certificate | list[Certificate]:
    """:func:`certify` on already clipped features (N, H', W', C)."""
    labels = np.broadcast_to(np.asarray(label, dtype=np.intp), (u.shape[0],)).copy()
    threat = _bind(threat, geometry)
    detect = [windows(geometry, r) for r in threat.rects]
    # Sums are float64 over float32 features; demand a margin above their rounding error.
    tol = 1e-9 * (1.0 + np.abs(u).sum(axis=(1, 2, 3)))
    margins = {rect_key(r): np.empty(len(labels)) for r in threat.rects}
    for s in range(0, len(labels), _FRAMES):  # a few frames at a time keep the window arrays in cache
        t = sat.table(u[s:s + _FRAMES])
        for r, w in zip(threat.rects, detect):
            m = _rect_margin(t, t[:, -1, -1, :], labels[s:s + _FRAMES], agg, w, detect)
            # An unbounded attacker gain (hi = inf, T = 1) gives -inf; JSON needs a finite number.
            margins[rect_key(r)][s:s + _FRAMES] = np.clip(m, -np.finfo(float).max, np.finfo(float).max)
    certs = [Certificate.from_rects(str(threat), {k: RectCert(bool(m[i] > tol[i]), float(m[i]))
                                                  for k, m in margins.items()})
             for i in range(u.shape[0])]
    return certs[0] if single else certs


# The paper's named defenses as settings of this one aggregation (Sec. VI-A, Table III).
VARIANTS: dict[str, dict] = {
    "mask-bn": {"feature": "logits", "threshold": 0.0, "clip": [0.0, None]},
    "cbn": {"feature": "logits", "threshold": 1.0, "clip": TANH},
    "mask-ds": {"feature": "confidence", "threshold": 0.0, "clip": [0.0, 1.0]},
    "drs": {"feature": "prediction", "threshold": 1.0, "clip": [0.0, 1.0], "abstain": 0.0},
}
SOURCES = ("local-logits", "ablation")


class MaskingCertifier(Certifier):
    """Mask-BN, CBN, Mask-DS and DRS from a bundle's ``defense.params`` (``source``; the :class:`MaskingOptions`).

    ``local-logits``: the engine maps the normalized frame to (N, H', W', C) local logits. ``ablation``: the
    engine is a base classifier on (N, 4, H, W) ablated inputs; all ablations of a batch of frames go to the
    engine as one batched call (chunked to its max batch) and come back as an (N, H', W', C) feature map.
    Features are that map; :meth:`decide` clips and masks it under any options.
    Local-logit certificates rely on exact locality; ablation locality holds on every backend (ablated pixels
    are multiplied by 0 in the graph), but an ablation's output must not depend on the rest of its batch (a
    patched frame's ablations run in another batch, and a margin or a one-hot vote can turn on the last bit).
    Both hold only on backends the export verified (``needs_exact``).
    """

    name = "masking"
    Options = MaskingOptions
    needs_exact = True
    local_outputs = True
    threat_in_features = False  # the threat enters only in decide

    def __init__(self, bundle, engines, threat: Threat, options: MaskingOptions | None = None):
        super().__init__(bundle, engines, threat, options)
        self.source = self.params.get("source", "local-logits")
        if self.source not in SOURCES:
            raise ValueError(f"masking bundle: source must be one of {SOURCES}, got {self.source!r}")
        self.geometry = Geometry.from_dict(self.manifest["geometry"])
        if self.source == "ablation":
            ab = self.params["ablation"]
            expected = ablation.geometry(self.input_hw, ab["mode"], int(ab["size"]), int(ab.get("stride", 1)))
            if expected != self.geometry:
                raise ValueError(f"masking bundle: geometry {self.geometry.to_dict()} does not match its ablation "
                                 f"{ab} ({expected.to_dict()})")

    def output_shapes(self, role: str = "model") -> tuple[tuple[int, ...], ...]:
        c = len(self.classes)
        return ((c,),) if self.source == "ablation" else ((*self.geometry.output_hw, c),)

    def local_features(self, x: np.ndarray) -> np.ndarray:
        """(N, H', W', C): the engine's local logits, or one base-classifier output per ablation."""
        if self.source == "local-logits":
            out = self.run_engine(x)
            return out[0] if isinstance(out, tuple) else out
        out = self.run_engine(ablation.batch(x, self.geometry))
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(len(x), *self.geometry.output_hw, out.shape[-1])

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.local_features(x)

    def decide(self, features: np.ndarray, options: MaskingOptions) -> list[Decision]:
        """Robust prediction (per-class masking) and its certificate for every frame's feature map."""
        u = options.features(features)
        scores = evidence(u, self.geometry, self.threat, options.threshold)
        labels = scores.argmax(axis=-1)
        certs = certify_features(u, labels, self.geometry, self.threat, options)
        return [Decision(label=int(labels[i]), certificate=certs[i], scores=scores[i].tolist())
                for i in range(len(certs))]
