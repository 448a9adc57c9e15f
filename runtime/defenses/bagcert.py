"""BagCert certification (Metzen & Yatsura 2021): binary region scores, spatial-sum aggregation g_Sigma.

For predicted class t, a patch at location l can change only the cells R(l) = ``geometry.affected``.
Worst case inside R(l): every other class scores 1 there and t scores 0 (Condition 3.1). With
``out_c(l)`` = votes of class c outside R(l), Condition 3.2 is

    out_t(l) - max_{c != t} out_c(l) > |R(l)|    for every location l of every rectangle,

evaluated for all locations at once with summed-area tables over the exact (clipped) affected ranges.
Condition 3.3 is the location-free bound  min_{c != t} (S_t - S_c) > 2 R^max.
Margins are the slack of the deciding inequality in cells (> 0 exactly when certified); ties are never
certified because every inequality is strict.

Backends that are not bit-exact (fp16 engines whose kernels mix neighbouring pixels) mark cells whose
pre-activation lies within the export tolerance of the threshold; such cells are assumed adversarial
everywhere (``uncertain``): t loses them and every other class gains them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from certinfer.threat import Threat, rect_key
from certinfer.runtime import sat
from certinfer.runtime.certifier import Certifier, Decision, Options
from certinfer.runtime.geometry import Geometry
from certinfer.runtime.verdict import Certificate, RectCert

CONDITIONS = ("3.2", "3.3")
RIVALS = 4  # classes besides the label that Condition 3.2 sums exactly; the rest are bounded


def _batched(scores: np.ndarray, label) -> tuple[np.ndarray, np.ndarray, bool]:
    s = np.asarray(scores)
    single = s.ndim == 3
    s = s[None] if single else s
    if s.ndim != 4:
        raise ValueError(f"scores must be (H', W', C) or (N, H', W', C), got shape {np.shape(scores)}")
    labels = np.broadcast_to(np.asarray(label, dtype=np.intp), (s.shape[0],))
    return (s != 0).astype(np.int32), labels, single


def _others_max(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """max over classes c != label along the last axis; x is (N, ..., C)."""
    mask = np.zeros((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],), dtype=bool)
    mask[np.arange(x.shape[0]), ..., labels] = True
    return np.where(mask, np.iinfo(np.int32).min, x).max(axis=-1)


def _take(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, labels.reshape((-1,) + (1,) * (x.ndim - 1)), axis=-1)[..., 0]


def _rival_order(total: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, C-1): the classes other than each sample's label, most votes first."""
    votes = total.astype(np.float64)
    votes[np.arange(len(labels)), labels] = -np.inf
    return np.argsort(-votes, axis=1, kind="stable")[:, :-1]


def condition_32(s: np.ndarray, labels: np.ndarray, geometry: Geometry, rects, rivals: int = RIVALS) -> dict:
    """Condition 3.2 slack per rectangle (min over locations), per sample. ``s`` is (N, H', W', C) int."""
    total = s.sum(axis=(1, 2))
    order = _rival_order(total, labels)
    return {rect: _rect_32(s, total, labels, order, geometry, rect, rivals) for rect in rects}


def _rect_32(s: np.ndarray, total: np.ndarray, labels: np.ndarray, order: np.ndarray, geometry: Geometry,
             rect: tuple[int, int], k: int) -> np.ndarray:
    """Window sums for the label and its ``k`` strongest rivals only; the other classes are bounded.

    A class c outside the candidates keeps at most S_c votes outside R(l), so its slack is at least
    min_l (out_t(l) - |R(l)|) - S_c. Classes whose bound falls below the candidates' exact minimum form a
    prefix of the rival order (most votes first); those samples are redone with that prefix included.
    """
    rows, cols = geometry.affected_ranges(rect)
    k = min(k, order.shape[1])
    cand = np.concatenate([labels[:, None], order[:, :k]], axis=1)
    cand_total = np.take_along_axis(total, cand, axis=1)
    table = sat.table(np.take_along_axis(s, cand[:, None, None, :], axis=-1))
    outside = cand_total[:, None, None, :] - sat.window_sums(table, rows, cols)
    own = outside[..., 0] - sat.window_sizes(rows, cols)  # t's votes left, less what the patch adds to a rival
    m = (own - outside[..., 1:].max(axis=-1)).min(axis=(1, 2))
    if k < order.shape[1]:
        excluded = np.take_along_axis(total, order[:, k:], axis=1)
        need = (own.min(axis=(1, 2))[:, None] - excluded < m[:, None]).sum(axis=1)
        redo = need > 0
        if redo.any():
            m[redo] = _rect_32(s[redo], total[redo], labels[redo], order[redo], geometry, rect, k + int(need.max()))
    return m


def rect_margins_33(s: np.ndarray, labels: np.ndarray, geometry: Geometry, rect: tuple[int, int]) -> np.ndarray:
    """Condition 3.3 slack: min_{c != t} (S_t - S_c) - 2 R^max."""
    total = s.sum(axis=(1, 2))
    return _take(total, labels) - _others_max(total, labels) - 2 * geometry.max_affected(rect)


def _worst_case(s: np.ndarray, uncertain: np.ndarray | None, labels: np.ndarray) -> np.ndarray:
    if uncertain is None:
        return s
    u = np.asarray(uncertain).reshape(s.shape) != 0
    worst = np.where(u, 1, s)
    is_label = np.arange(s.shape[-1])[None, None, None, :] == labels[:, None, None, None]
    return np.where(u & is_label, 0, worst)


def certify(scores: np.ndarray, label, geometry: Geometry, threat: Threat, condition: str = "3.2",
            uncertain: np.ndarray | None = None) -> Certificate | list[Certificate]:
    """Certify class ``label`` on binary score maps (H', W', C) or (N, H', W', C) against every rect of ``threat``."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    s, labels, single = _batched(scores, label)
    s = _worst_case(s, uncertain, labels)
    threat = threat if threat.input_hw == tuple(geometry.input_hw) else threat.bind(geometry.input_hw)
    if condition == "3.2":
        by_rect = condition_32(s, labels, geometry, threat.rects)
    else:
        by_rect = {r: rect_margins_33(s, labels, geometry, r) for r in threat.rects}
    margins = {rect_key(r): m for r, m in by_rect.items()}
    certs = [Certificate.from_rects(str(threat), {k: RectCert(bool(m[i] > 0), float(m[i])) for k, m in margins.items()})
             for i in range(s.shape[0])]
    return certs[0] if single else certs


def predict(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """g_Sigma: per-class vote counts (N, C) and the argmax label (N,)."""
    s = np.asarray(scores)
    s = s[None] if s.ndim == 3 else s
    counts = (s != 0).sum(axis=(1, 2))
    return counts, counts.argmax(axis=-1)


def split_code(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exported graph's uint8 code: bit 0 is H(z), bit 1 marks |z| below the export tolerance."""
    code = np.asarray(code)
    return code & 1, (code >> 1) & 1


@dataclass(frozen=True)
class BagCertOptions(Options):
    """``condition``: ``"3.2"`` (exact per location) or ``"3.3"`` (receptive-field-agnostic bound)."""

    condition: str = "3.2"

    def __post_init__(self) -> None:
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")


@dataclass(frozen=True)
class BagCertFeatures:
    scores: np.ndarray  # (N, H', W', C) binary votes
    uncertain: np.ndarray | None  # cells near the threshold on an unverified backend, else None


class BagCertCertifier(Certifier):
    """Engine output: uint8 (N, H', W', C) code map; certification of the predicted class.

    On a backend the export did not verify bit-exact, cells near the threshold count as adversarial (see the
    module docstring) instead of withdrawing every certificate.
    """

    name = "bagcert"
    Options = BagCertOptions
    local_outputs = True
    threat_in_features = False  # the threat enters only in decide

    def __init__(self, bundle, engines, threat: Threat, options: BagCertOptions | None = None):
        super().__init__(bundle, engines, threat, options)
        self.geometry = Geometry.from_dict(self.manifest["geometry"])

    def output_shapes(self, role: str = "model") -> tuple[tuple[int, ...], ...]:
        return (tuple(self.geometry.output_hw) + (len(self.classes),),)

    def local_features(self, x: np.ndarray) -> np.ndarray:
        out = self.run_engine(x)
        return out[0] if isinstance(out, tuple) else out

    def infer(self, x: np.ndarray) -> BagCertFeatures:
        scores, near = split_code(self.local_features(x))
        return BagCertFeatures(scores, None if self.trusted else near)

    def decide(self, features: BagCertFeatures, options: BagCertOptions) -> list[Decision]:
        counts, labels = predict(features.scores)
        certs = certify(features.scores, labels, self.geometry, self.threat, options.condition,
                        uncertain=features.uncertain)
        return [Decision(label=int(labels[i]), certificate=certs[i], scores=counts[i].tolist())
                for i in range(len(certs))]
