"""ScaleCert (Han et al., NeurIPS 2021): sparse superficial layer, occlusion windows, certified detection.

Model. A CNN whose superficial layer ``s`` (an early conv block, geometry in the manifest) is followed by the
SIN layer: score = activations summed over channels; keep the positions whose score is >= the k-th largest
("winners", ties all kept); every later layer reads only the pruned map (winners' features, zeros elsewhere).
The engine takes ONE array (N, C+1, H, W): the normalized frame and, in channel C, an occlusion mask (1 =
occluded). In the graph occluded pixels are replaced by exactly +0.0 (the training mean; a ``Where``, so no
patch value, not even a NaN or the sign of a zero, passes), and every superficial position whose receptive field
meets an occluded pixel ("affected": a max-pool of the mask with the layer's geometry) is excluded from the
winners explicitly (its score is also set to the lowest float, but exclusion, not the sentinel, is what decides:
with many zero scores after ReLU the k-th largest may equal any sentinel). Outputs: logits (N, classes) and the
winner mask (N, H', W').

Windows. For a p_h x p_w patch the occlusion window is (p_h + r - 1) x (p_w + r - 1), r = 3, at every position
INSIDE the frame (at the border it is shifted in, never cut, so every patch position is fully covered by some
window). Windows are merged per axis in groups of g consecutive positions, g the largest with
((s - g + 1) / s) >= sqrt(tau) (first and last window of a group overlap by >= tau of a window's area). The
family depends only on the input size, patch and tau, never on the image: see why below. R(x) is the union of
the receptive fields of x's winners; a window is evaluated when it meets R(x) (computed as: some winner lies in
the window's affected output range).

Soundness (why Algorithm 2 => Algorithm 1 returns the label or alerts). Needs: exact locality of the superficial
layer (probed at export, trusted only on ``probe.exact_backends``), batch-independent outputs, no path from the
input to the head except through the pruned map, and a window family independent of the image.
(A) A window w with w /\\ R(x) = {} leaves the prediction bit-identical: winners' receptive fields miss w, so their
    features and scores are unchanged; every other score is unchanged or excluded (<  the old k-th value t), so
    the k-th largest is still t and the winner set is the same; the pruned map, hence the logits, are identical.
(B) Let x be certified (label y; every window meeting R(x) gives y) and x' = x with a patch at q, M(x') = y' != y.
    Every family window W containing the patch sees x' (occluded by W) == x (occluded by W) bit for bit, so
    M(x' without W) = M(x without W) = y: by certification if W meets R(x), else by (A). If W missed R(x') then
    (A) on x' would give y' instead: so every window containing the patch meets R(x'), is evaluated and says y
    != y'. Algorithm 1 line 11 (all windows containing some patch position agree on a label other than M(x'))
    fires: alert, with that position.
    A data-dependent merge (windows merged over R(x')) would break (B): the window covering the patch in
    x' need not be one Algorithm 2 evaluated for x. Hence the fixed family.
Ties: a certificate needs every evaluated window's top logit to beat the runner-up strictly (ties as flips).
Two engine calls per batch: pass 1 the frames (mask all zeros) for the label and R, pass 2 every evaluated
occluded copy of every frame of the batch, one batched call (chunked by the engine). Frames are replicated
against their masks (the engine protocol takes one array: no broadcasting).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from certinfer.threat import Rect, Threat, rect_key
from certinfer.runtime import sat
from certinfer.runtime.certifier import Certifier, Decision, Options
from certinfer.runtime.geometry import Geometry
from certinfer.runtime.verdict import Certificate, RectCert

DEFAULT_R = 3
DEFAULT_TAU = 0.3


def window_side(patch: int, r: int, side: int) -> int:
    """Occlusion window side for a patch side: patch + r - 1, at most the frame's side."""
    if not 1 <= patch <= side or r < 1:
        raise ValueError(f"patch side {patch} must lie in [1, {side}] and r >= 1")
    return min(patch + r - 1, side)


def group_size(window: int, tau: float) -> int:
    """Window positions merged per axis: the largest g with (window - g + 1) / window >= sqrt(tau)."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"overlap ratio tau must lie in (0, 1], got {tau}")
    return max(1, int(np.floor(window + 1 - window * np.sqrt(tau) + 1e-9)))


def _axis_windows(side: int, window: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Half-open merged ranges [lo, hi) on one axis: groups of g consecutive window positions in [0, side-window]."""
    starts = np.arange(0, side - window + 1, g)
    last = np.minimum(starts + g - 1, side - window)
    return starts, last + window


@dataclass(frozen=True, eq=False)
class Family:
    """The merged occlusion windows of one patch rectangle: a grid ``rows x cols`` of half-open pixel ranges."""

    input_hw: tuple[int, int]
    rect: Rect
    rows: tuple[np.ndarray, np.ndarray]
    cols: tuple[np.ndarray, np.ndarray]

    @property
    def size(self) -> int:
        return len(self.rows[0]) * len(self.cols[0])

    def boxes(self) -> np.ndarray:
        """(F, 4) windows as (top, bottom, left, right), half-open, row-major over the grid."""
        r0, r1 = np.repeat(self.rows[0], len(self.cols[0])), np.repeat(self.rows[1], len(self.cols[0]))
        c0, c1 = np.tile(self.cols[0], len(self.rows[0])), np.tile(self.cols[1], len(self.rows[0]))
        return np.stack([r0, r1, c0, c1], axis=1)

    @cached_property
    def masks(self) -> np.ndarray:
        """(F, H, W) float32 occlusion masks, 1 inside the window."""
        out = np.zeros((self.size, *self.input_hw), np.float32)
        for f, (t, b, l, r) in enumerate(self.boxes()):
            out[f, t:b, l:r] = 1.0
        return out

    @cached_property
    def containing(self) -> np.ndarray:
        """(L, F) bool: window f contains the whole patch at location l (locations row-major, inside the frame)."""
        (h, w), (ph, pw) = self.input_hw, self.rect
        t, s = np.arange(h - ph + 1), np.arange(w - pw + 1)
        rows = (self.rows[0][None] <= t[:, None]) & (t[:, None] + ph <= self.rows[1][None])  # (Lh, Fh)
        cols = (self.cols[0][None] <= s[:, None]) & (s[:, None] + pw <= self.cols[1][None])  # (Lw, Fw)
        return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(len(t) * len(s), self.size)


@lru_cache(maxsize=256)
def family(input_hw: tuple[int, int], rect: Rect, r: int = DEFAULT_R, tau: float = DEFAULT_TAU) -> Family:
    """The merged window family of ``rect``; raises if some patch position were left uncovered (cannot happen)."""
    axes = []
    for side, patch in zip(input_hw, rect):
        window = window_side(patch, r, side)
        axes.append(_axis_windows(side, window, group_size(window, tau)))
    fam = Family(tuple(int(v) for v in input_hw), tuple(int(v) for v in rect), axes[0], axes[1])
    if not fam.containing.any(axis=1).all():
        raise AssertionError(f"window family of {rect} leaves a patch position uncovered")
    return fam


def candidate_region(keep: np.ndarray, geometry: Geometry) -> np.ndarray:
    """R: input pixels (..., H, W) bool in the receptive field of some winner of ``keep`` (..., H', W')."""
    keep = np.asarray(keep) > 0
    (h, w), (rh, rw), (sh, sw), (ph, pw) = geometry.input_hw, geometry.rf, geometry.stride, geometry.padding
    oh, ow = keep.shape[-2:]
    full = np.zeros(keep.shape[:-2] + ((oh - 1) * sh + rh, (ow - 1) * sw + rw), dtype=bool)
    for di in range(rh):
        for dj in range(rw):
            full[..., di:di + (oh - 1) * sh + 1:sh, dj:dj + (ow - 1) * sw + 1:sw] |= keep
    # full[..., a, b] is input pixel (a - ph, b - pw) (padding >= 0); crop to the frame
    out = np.zeros(keep.shape[:-2] + (h, w), dtype=bool)
    src = full[..., ph:ph + h, pw:pw + w]
    out[..., :src.shape[-2], :src.shape[-1]] = src
    return out


@lru_cache(maxsize=256)
def _affected_boxes(fam: Family, geometry: Geometry) -> np.ndarray:
    """(F, 4) half-open output ranges (r0, r1, c0, c1) each window of ``fam`` can change."""
    out = []
    for t, b, l, r in fam.boxes():
        (r0, r1), (c0, c1) = geometry.affected((int(b - t), int(r - l)), (int(t), int(l)))
        out.append((r0, r1, c0, c1))
    return np.asarray(out, dtype=np.intp).reshape(-1, 4)


def meets_region(keep: np.ndarray, fam: Family, geometry: Geometry) -> np.ndarray:
    """(N, F) bool: window f meets R(x), i.e. some winner lies in the outputs window f can change."""
    t = sat.table((np.asarray(keep) > 0)[..., None])[..., 0]  # (N, H'+1, W'+1)
    r0, r1, c0, c1 = _affected_boxes(fam, geometry).T
    return (t[:, r1, c1] - t[:, r0, c1] - t[:, r1, c0] + t[:, r0, c0]) > 0


def margins(logits: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Top logit of ``label`` minus the best other class's, per row (..., C); > 0 exactly when label wins strictly."""
    z = np.asarray(logits, np.float64)
    own = np.take_along_axis(z, label[..., None], axis=-1)[..., 0]
    other = z.copy()
    np.put_along_axis(other, label[..., None], -np.inf, axis=-1)
    return own - other.max(axis=-1)


@dataclass
class Occlusions:
    """Pass-2 results of one frame for one rectangle: which windows were evaluated and their logits."""

    selected: np.ndarray  # (F,) bool
    logits: np.ndarray  # (F, C); rows not selected are zeros


def certify_frame(logits0: np.ndarray, occ: dict[str, Occlusions]) -> tuple[int, dict[str, RectCert]]:
    """Algorithm 2: certified for a rectangle when every evaluated window keeps the label strictly.

    margin: the smallest top-logit gap over the unoccluded frame and the evaluated windows (> 0 iff certified).
    """
    label = int(np.argmax(logits0))
    base = float(margins(logits0[None], np.array([label]))[0])
    per_rect = {}
    for key, o in occ.items():
        m = margins(o.logits[o.selected], np.full(int(o.selected.sum()), label))
        margin = min([base, *m.tolist()])
        per_rect[key] = RectCert(bool(margin > 0), margin)
    return label, per_rect


def detect_frame(logits0: np.ndarray, occ: dict[str, Occlusions], fams: dict[str, Family]) -> tuple[str, str]:
    """Algorithm 1: ("", "") for the label, or ("alert", reason with the patch location).

    Line 11, generalized to merged windows: some patch position (of some rectangle) whose containing windows were
    all evaluated and all predict the same label other than the prediction. Lines 13-16: otherwise, disagreeing
    windows whose majority label (ties included) is not the prediction also alert.
    """
    y = int(np.argmax(logits0))
    votes = []
    for key, o in occ.items():
        labels = np.where(o.selected, o.logits.argmax(axis=-1), -1)
        votes.append(labels[o.selected])
        if not (o.selected & (labels != y)).any():
            continue
        c = fams[key].containing
        count = c.sum(axis=1)
        for other in np.unique(labels[o.selected & (labels != y)]):
            hit = np.flatnonzero((c & (labels == other)[None]).sum(axis=1) == count)
            if len(hit):
                top, left = divmod(int(hit[0]), fams[key].input_hw[1] - fams[key].rect[1] + 1)
                return "alert", (f"patch detected: a {key} patch at row {top}, column {left} (every window covering "
                                 f"it predicts class {int(other)}, the frame {y})")
    if votes:
        v = np.concatenate(votes)
        if len(v) and (v != y).any():
            counts = np.bincount(v, minlength=y + 1)
            if counts.argmax() != y or (counts == counts[y]).sum() > 1:
                return "alert", f"possible patch: occluded predictions disagree with the frame's {y} (majority vote)"
    return "", ""


@dataclass(frozen=True)
class ScaleCertOptions(Options):
    """The occlusion windows: ``r`` (window side = patch + r - 1) and ``tau`` (merge ratio, in (0, 1])."""

    INFER = ("r", "tau")

    r: int = DEFAULT_R
    tau: float = DEFAULT_TAU

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or int(self.r) != self.r or self.r < 1:
            raise ValueError(f"scalecert: r must be a positive integer, got {self.r!r}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"scalecert: overlap ratio tau must lie in (0, 1], got {self.tau}")
        object.__setattr__(self, "r", int(self.r))
        object.__setattr__(self, "tau", float(self.tau))


@dataclass(frozen=True)
class ScaleCertFeatures:
    """Both passes of a batch: the frames' logits (N, C) and winner masks (N, H', W'), and per rectangle key the
    window family used with which windows were evaluated and their logits."""

    logits0: np.ndarray
    keep: np.ndarray
    families: dict[str, Family]
    occlusions: dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (selected (N, F) bool, logits (N, F, C))


class ScaleCertCertifier(Certifier):
    """ScaleCert from a bundle's ``defense.params``: ``r``, ``tau`` (window merge, :class:`ScaleCertOptions`),
    ``top_k`` (winner count, for the record); geometry: the superficial layer's. Kind ``detection``: status
    ``alert`` (label -1, the location in ``reason``) when Algorithm 1 detects a patch, else the label, certified
    when Algorithm 2 holds. Certificates rely on exact locality: only on ``probe.exact_backends`` at fp32.

    Not ``local_outputs``: the winner mask is global (top-k), so the export probe checks the superficial layer's
    features (the manifest's ``probe.op``) instead.
    """

    name = "scalecert"
    Options = ScaleCertOptions
    needs_exact = True

    def __init__(self, bundle, engines, threat: Threat, options: ScaleCertOptions | None = None):
        super().__init__(bundle, engines, threat, options)
        self.geometry = Geometry.from_dict(self.manifest["geometry"])
        if self.geometry.input_hw != self.input_hw:
            raise ValueError(f"scalecert bundle: geometry input {self.geometry.input_hw} is not the input "
                             f"{self.input_hw}")

    @property
    def kind(self) -> str:
        return "detection"

    def families(self) -> dict[str, Family]:
        """The window family of each rectangle of the threat, under this certifier's ``r`` and ``tau``."""
        o = self.options
        return {rect_key(r): family(self.input_hw, tuple(r), o.r, o.tau) for r in self.threat.rects}

    def output_shapes(self, role: str = "model") -> tuple[tuple[int, ...], ...]:
        return ((len(self.classes),), tuple(self.geometry.output_hw))

    def engine_input(self, x: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """(N, C+1, H, W): frames with their occlusion masks (zeros when None)."""
        m = np.zeros((len(x), 1, *x.shape[2:]), np.float32) if masks is None else masks[:, None]
        return np.ascontiguousarray(np.concatenate([x, m], axis=1), dtype=np.float32)

    def infer(self, x: np.ndarray) -> ScaleCertFeatures:
        """Pass 1 on the frames (label, winners), pass 2 on every evaluated occluded copy, in one engine call."""
        logits0, keep = self.run_engine(self.engine_input(x))
        fams = self.families()
        selected = {k: meets_region(keep, f, self.geometry) for k, f in fams.items()}
        hits = {k: np.nonzero(s) for k, s in selected.items()}
        frames = np.concatenate([n for n, _ in hits.values()])
        occluded = {k: np.zeros((len(x), f.size, len(self.classes)), np.float32) for k, f in fams.items()}
        if len(frames):
            masks = np.concatenate([fams[k].masks[w] for k, (_, w) in hits.items()])
            z, _ = self.run_engine(self.engine_input(x[frames], masks))
            i = 0
            for k, (n, w) in hits.items():
                occluded[k][n, w] = z[i:i + len(n)]
                i += len(n)
        return ScaleCertFeatures(logits0, keep, fams, {k: (selected[k], occluded[k]) for k in fams})

    def decide(self, features: ScaleCertFeatures, options: ScaleCertOptions) -> list[Decision]:
        """Algorithms 1 and 2 per frame, on the windows the features were inferred with."""
        fams, occ = features.families, features.occlusions
        decisions = []
        for i, logits0 in enumerate(features.logits0):
            per = {k: Occlusions(occ[k][0][i], occ[k][1][i]) for k in fams}
            label, per_rect = certify_frame(logits0, per)
            status, reason = detect_frame(logits0, per, fams)
            cert = Certificate.from_rects(str(self.threat), per_rect, kind="detection")
            decisions.append(Decision(label=-1 if status == "alert" else label, certificate=cert, status=status,
                                      scores=logits0.astype(float).tolist(), reason=reason))
        return decisions
