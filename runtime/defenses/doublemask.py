"""Double masking (PatchCleanser, Xiang et al. 2022): certified recovery for any classifier.

Mask set. For every rectangle h x w of the threat, masks of (h + s - 1) x (w + s - 1) pixels (at most the input)
at stride s per axis, the last one flush with the border, deduplicated: every location of every rectangle lies
inside some mask (the covering property). Per axis, a patch starting at t lies in the mask starting at
p = s * floor(t / s) (p <= t and p + h + s - 1 >= t + h), or in the flush last mask when t is past it.
Masked pixels are replaced by one value fixed per bundle (``defense.params.mask_value``, in the space that is
masked), in training and at run time alike (:func:`masked_copies`).

Certificate. A frame is certified for y when the classifier says y, with a strict margin, under every mask and
every pair of masks. Inference (:func:`recover`, the paper's Algorithm 1) then returns y on any patched frame:
the patch lies inside some mask m*, so every copy masked by m* is a copy of the clean frame. Case 1 (all one-mask
predictions agree) includes m*'s, which is y. Case 2 returns a disagreeing mask m0 whose whole second round
agrees with it, including the pair (m0, m*), which is y. Case 3 happens only when y is the majority: had m*
disagreed, its second round (all clean pairs, all y) would have agreed, and case 2 would have returned y.

Feature space (PatchCURE, Xiang et al. 2024). A front part maps the frame to a feature map once; a pixel mask
becomes the feature cells whose receptive field meets it (:func:`feature_masks`), and only the back part runs
per masked copy. The argument above holds on the feature map as long as a patch changes only the cells its
receptive field reaches, which the export's locality probe verifies per backend.

Backends. Certification and a later inference run the same masked copy in different batches. On a backend the
export verified batch-independent (``probe.exact_backends``) the copy's output is the same bits, so a strict margin
suffices. Pixel space on any other fp32 backend (torch's and GPU kernels round differently by batch size):
the copies the argument above reads are bit-identical inputs whose logits move by less than half
``tolerance`` (``defense.params.tolerance``, logit units; ``certinfer inspect --probe`` checks it), so their
label's gap moves by less than the tolerance: certified when every gap exceeds it. Feature space also needs the
front part's locality bit for bit, which only a verified backend has: elsewhere certificates are withdrawn, as
they are for engines below fp32 in both spaces.

Occlusion batching. The K one-mask copies of every frame of a batch go to the engine as one call. Then the
second round: for frames whose first round disagrees (never certifiable) only the pairs inference reads (the rows
of their disagreeing masks); for frames whose first round agrees (case 1: the label is decided, only the
certificate is open) the K(K-1)/2 pairs in :func:`pair_order`, nearest the centre first, a block per call, until
one pair fails. The certificate fails at the first failing pair whatever the rest say, so the margin of such a
frame is read up to that pair: decisions do not depend on how the pairs are batched. A GPU engine takes every pair
in one block; on a CPU engine calls are a few megabytes: feature-space copies that stay in cache run faster (a few
percent on a quiet machine, a fifth when other work shares the memory bus), and most uncertified frames stop
after their first block. A pair whose copy masks exactly what an earlier copy masks (:func:`twins`: feature masks
nest near the border) reads that copy's output instead of running again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from certinfer.threat import Threat, parse
from certinfer.runtime.certifier import (EXACT_PRECISION, TIE_TOLERANCE, Certifier, Decision, EngineRunError,
                                         Options)
from certinfer.runtime.engines import DeviceMasking
from certinfer.runtime.geometry import Geometry
from certinfer.runtime.verdict import Certificate, RectCert

Pair = tuple[int, int]


def _pair(stride: int | Sequence[int]) -> Pair:
    pair = tuple(np.atleast_1d(np.asarray(stride)).tolist())
    pair = pair * 2 if len(pair) == 1 else pair
    if len(pair) != 2 or not all(type(v) is int and v >= 1 for v in pair):
        raise ValueError(f"mask stride must be a positive integer or a pair of them, got {stride!r}")
    return pair


def _axis(n: int, size: int, stride: int) -> tuple[list[int], int]:
    """Mask starts along one axis of length ``n`` (every ``stride``, the last flush with the border) and the size."""
    size = min(size, n)
    last = n - size
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts, size


def mask_boxes(input_hw: Pair, threat: str | Threat, stride: int | Sequence[int]) -> np.ndarray:
    """The mask set as boxes: int64 (K, 4) rows ``(top, left, height, width)``, in order of the threat's
    rectangles, then rows, then columns; duplicates dropped (first kept)."""
    hw = (int(input_hw[0]), int(input_hw[1]))
    bound = parse(threat, input_hw=hw) if isinstance(threat, str) else threat.bind(hw)
    sh, sw = _pair(stride)
    boxes: dict[tuple[int, int, int, int], None] = {}
    for h, w in bound.rects:
        rows, mh = _axis(hw[0], h + sh - 1, sh)
        cols, mw = _axis(hw[1], w + sw - 1, sw)
        boxes.update(((r, c, mh, mw), None) for r in rows for c in cols)
    return np.array(list(boxes), dtype=np.int64).reshape(-1, 4)


def box_masks(boxes: np.ndarray, input_hw: Pair) -> np.ndarray:
    """bool (K, H, W) masks, True inside each ``(top, left, height, width)`` box."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    rows, cols = np.arange(input_hw[0]), np.arange(input_hw[1])
    in_rows = (rows[None] >= b[:, :1]) & (rows[None] < b[:, :1] + b[:, 2:3])
    in_cols = (cols[None] >= b[:, 1:2]) & (cols[None] < b[:, 1:2] + b[:, 3:4])
    return in_rows[:, :, None] & in_cols[:, None, :]


def mask_set(input_hw: Pair, threat: str | Threat, stride: int | Sequence[int]) -> np.ndarray:
    """bool (K, H, W), True = masked: the covering mask set of ``threat`` at ``stride`` (see the module docstring)."""
    return box_masks(mask_boxes(input_hw, threat, stride), input_hw)


def masked_copies(base: np.ndarray, masked: np.ndarray, frames: np.ndarray,
                  value: float | Sequence[float] = 0.0) -> np.ndarray:
    """Masked copies: row r is ``base[frames[r]]`` with the positions ``masked[r]`` set to ``value``.

    ``base`` (N, C, H, W), ``masked`` bool (R, H, W), ``frames`` int (R,), ``value`` a scalar or one per channel
    -> float32 (R, C, H, W). Unmasked positions keep ``base``'s bits exactly (-0.0 and NaN included), masked ones
    hold exactly ``value``. Built as one bitwise AND per run of equal frames, broadcast from the frame (no gathered
    intermediate): the feature-space copies are large, and building them moves most of the bytes.
    """
    bits = np.ascontiguousarray(base, dtype=np.float32).view(np.uint32)
    masked = np.asarray(masked, dtype=bool)
    frames = np.asarray(frames, dtype=np.int64)
    if masked.shape[0] != len(frames) or masked.shape[1:] != bits.shape[2:]:
        raise ValueError(f"masked_copies: masks {masked.shape} do not fit {len(frames)} rows of {bits.shape[1:]}")
    keep = np.where(masked, np.uint32(0), np.uint32(0xFFFFFFFF))[:, None]
    out = np.empty((len(frames), *bits.shape[1:]), dtype=np.uint32)
    starts = np.flatnonzero(np.diff(frames, prepend=-1))
    for s, e in zip(starts, np.append(starts[1:], len(frames))):
        np.bitwise_and(bits[frames[s]], keep[s:e], out=out[s:e])
    copies = out.view(np.float32)  # masked positions hold +0.0 here
    v = np.asarray(value, dtype=np.float32)
    if v.any() or np.signbit(v).any():
        np.copyto(copies, v.reshape(-1, 1, 1) if v.ndim else v, where=masked[:, None])
    return copies


def feature_masks(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """bool (K', H', W'): for each pixel mask box, the feature cells whose receptive field meets it
    (``Geometry.affected``); duplicates dropped (first kept)."""
    out: dict[bytes, np.ndarray] = {}
    for top, left, h, w in np.asarray(boxes, dtype=np.int64).reshape(-1, 4).tolist():
        (r0, r1), (c0, c1) = geometry.affected((h, w), (top, left))
        m = np.zeros(geometry.output_hw, dtype=bool)
        m[r0:r1, c0:c1] = True
        out.setdefault(m.tobytes(), m)
    return np.stack(list(out.values())) if out else np.zeros((0, *geometry.output_hw), dtype=bool)


def pair_order(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two-mask pairs ``(i, j)``, ``i < j``, in the order certification checks them: pair ``p`` masks ``i[p]``
    and ``j[p]``. Nearest the centre first (by the sum of both masks' squared centre offsets, in half cells, an
    integer), ties in row-major order. A sign fills the middle of its box, so the pair that breaks a certificate
    usually comes among the first few and checking stops there (:class:`DoubleMaskOptions`)."""
    masks = np.asarray(masks, dtype=bool)
    i, j = np.triu_indices(len(masks), 1)
    if not len(i):
        return i, j
    offsets = np.zeros(len(masks), dtype=np.int64)
    for axis, size in ((2, masks.shape[1]), (1, masks.shape[2])):
        hit = masks.any(axis=axis)  # (K, size): rows (or columns) each mask touches
        first, last = hit.argmax(axis=1), size - 1 - hit[:, ::-1].argmax(axis=1)
        offsets += (first + last - (size - 1)) ** 2
    order = np.argsort(offsets[i] + offsets[j], kind="stable")
    return i[order], j[order]


def majority(preds: np.ndarray) -> int:
    """The most frequent label. The paper leaves ties open; here the largest label wins, which is what the
    authors' released code returns (``np.unique`` counts, ``argsort``, last taken) where numpy's sort keeps equal
    counts in order, as it does on small arrays."""
    labels, counts = np.unique(preds, return_counts=True)
    return int(labels[counts == counts.max()].max())


def recover(one: np.ndarray, two: np.ndarray) -> tuple[int, int]:
    """PatchCleanser's double-masking inference on predictions: ``(label, case)``.

    ``one``: (K,) one-mask predictions; ``two``: (K, K) two-mask predictions (symmetric, the diagonal equal to
    ``one``; entries < 0 were not run, and only rows of disagreeing masks are read). Case 1: every one-mask
    prediction agrees. Case 2: the first disagreeing mask (in mask order) whose second round agrees with it
    entirely gives its label. Case 3: the majority of the one-mask predictions.
    """
    top = majority(one)
    disagreers = np.flatnonzero(one != top)
    if len(disagreers) == 0:
        return top, 1
    for i in disagreers:
        row = two[i]
        if (row < 0).any():
            raise ValueError(f"the second round of mask {i} was not run")
        if (row == one[i]).all():
            return int(one[i]), 2
    return top, 3


def gaps(logits: np.ndarray, labels: int | np.ndarray) -> np.ndarray:
    """The label's logit minus the largest other logit, per row of (..., C) (one label, or one per row): > 0
    exactly when the label wins outright (a tie gives 0)."""
    labels = np.broadcast_to(np.asarray(labels, dtype=np.intp), logits.shape[:-1])[..., None]
    own = np.take_along_axis(logits, labels, axis=-1)[..., 0]
    others = np.where(np.arange(logits.shape[-1]) == labels, -np.inf, logits).max(axis=-1)
    return own - others


SPACES = ("pixel", "feature")
FEATURE_ROLES = ("front", "back")
BATCH_BYTES = 256 << 20  # masked copies built at once (each build is one engine call, chunked by the engine)
CPU_BATCH_BYTES = 3 << 20  # on a CPU engine: copies that stay in cache run faster than one large call


def rows_per_call(row_nbytes: int, cpu: bool) -> int:
    """Masked copies of ``row_nbytes`` each per engine call: :data:`BATCH_BYTES` of them, :data:`CPU_BATCH_BYTES`
    on a CPU engine (at least one)."""
    return max(1, (CPU_BATCH_BYTES if cpu else BATCH_BYTES) // max(int(row_nbytes), 1))


@dataclass(frozen=True)
class DoubleMaskOptions(Options):
    """``early_exit``: a frame whose one-mask predictions disagree cannot be certified, so only the second rounds
    its inference reads (the pairs of its disagreeing masks) are run; a frame whose one-mask predictions agree has
    its label (case 1) and runs its pairs in :func:`pair_order`, a block per engine call, until one fails. False
    runs every pair of every frame. Decisions are identical either way (the margin reads only the pairs up to the
    first that fails).

    ``device_copies``: where the engine builds masked copies itself (``run_masked``: the torch backend, on its
    device), send it the frames and mask indices instead of host-built copies. Same copies, same decisions; False
    builds them on the host (to measure what it saves)."""

    INFER: ClassVar[tuple[str, ...]] = ("early_exit",)
    early_exit: bool = True
    device_copies: bool = True

    def __post_init__(self) -> None:
        for name in ("early_exit", "device_copies"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class DoubleMaskFeatures:
    one: np.ndarray  # float32 (N, K, C): logits under each mask
    two: np.ndarray  # int64 (N, P): prediction under each pair of pair_order(masks); -1 where not run
    two_gap: np.ndarray  # float32 (N, P): gap (see gaps) of the frame's one-mask majority under each pair run
    rows: np.ndarray  # int64 (N,): engine rows (masked copies run) per frame


def _space(params: Mapping[str, Any]) -> str:
    space = params.get("space", "pixel")
    if space not in SPACES:
        raise ValueError(f"doublemask bundle: space must be one of {SPACES}, got {space!r}")
    return space


def twins(masks: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Per pair ``(i[p], j[p])``: the first copy that masks exactly the same positions, ``m`` for the one-mask copy
    ``m``, ``K + q`` for an earlier pair ``q``; -1 when there is none. Feature masks nest near the border (the
    receptive field reaches past it), so a pair can equal one mask or another pair: its copy need not run again."""
    k = len(masks)
    first: dict[bytes, int] = {}
    for m, mask in enumerate(masks):
        first.setdefault(mask.tobytes(), m)
    out = np.full(len(i), -1, dtype=np.int64)
    for p, key in enumerate((masks[a] | masks[b]).tobytes() for a, b in zip(i.tolist(), j.tolist())):
        if key in first:
            out[p] = first[key]
        else:
            first[key] = k + p
    return out


@lru_cache(maxsize=64)
def _masks(input_hw: Pair, threat: str, stride: Pair,
           geometry: Geometry | None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The masks, their :func:`pair_order` and the pairs' :func:`twins`, read-only."""
    boxes = mask_boxes(input_hw, threat, stride)
    masks = box_masks(boxes, input_hw) if geometry is None else feature_masks(boxes, geometry)
    pairs = pair_order(masks)
    same = twins(masks, *pairs)
    for a in (masks, *pairs, same):
        a.flags.writeable = False
    return masks, pairs, same


class DoubleMaskCertifier(Certifier):
    """PatchCleanser double masking over a classifier, masks in pixel space or on a feature map (PatchCURE).

    ``defense.params``: ``stride`` (the mask stride the model was trained for, an int or [rows, cols]),
    ``mask_value`` (what masked positions hold, in the masked space: normalized pixels or features; a scalar or
    one value per channel; default 0.0), ``space`` (``pixel``: engine role ``model`` maps normalized frames to
    logits; ``feature``: role ``front`` maps frames to an NCHW feature map with the manifest's ``geometry``, role
    ``back`` maps (masked) feature maps to logits).

    Certified for label y when every one- and two-mask prediction is y with a margin above :attr:`required_margin`
    (0 on a verified backend: ties are flips; ``defense.params.tolerance`` elsewhere, see the module docstring);
    the margin is the smallest gap of y's logit over the best other class among the copies (on a frame that is
    not certified, among the copies read until the certificate failed: the one-mask copies, then the pairs in
    check order up to the first that fails). :meth:`decide` then
    returns y by case 1, and the inference returns y on any patched frame. Both variants rely on the engine
    giving a masked copy the same output in whatever batch it runs (certification and a later inference batch the
    copies differently): the same bits on a verified backend, within half the tolerance per logit elsewhere (pixel
    space); the feature variant also on the front part's locality (a patch changes only the cells
    ``geometry.affected`` names, its map is ``local_features``), which holds bit-exact only on the backends the
    export probed.
    """

    name = "doublemask"
    Options = DoubleMaskOptions

    @classmethod
    def roles_for(cls, manifest: Mapping[str, Any]) -> tuple[str, ...]:
        return FEATURE_ROLES if _space(manifest["defense"].get("params", {})) == "feature" else cls.roles

    def __init__(self, bundle, engines, threat: Threat, options: DoubleMaskOptions | None = None):
        super().__init__(bundle, engines, threat, options)
        self.space = _space(self.params)
        if "stride" not in self.params:
            raise ValueError("doublemask bundle: defense.params has no mask stride")
        self.stride = _pair(self.params["stride"])
        self.mask_value = np.asarray(self.params.get("mask_value", 0.0), dtype=np.float32)
        if self.mask_value.ndim > 1 or not np.isfinite(self.mask_value).all():
            raise ValueError(f"doublemask bundle: mask_value must be a finite number or one per channel, "
                             f"got {self.params.get('mask_value')!r}")
        self.geometry = Geometry.from_dict(self.manifest["geometry"]) if self.space == "feature" else None
        if self.geometry is not None and self.geometry.input_hw != self.input_hw:
            raise ValueError(f"doublemask bundle: geometry input {self.geometry.input_hw} is not the input "
                             f"{self.input_hw}")
        self.tolerance = float(self.params.get("tolerance", TIE_TOLERANCE))
        if not self.tolerance > 0:
            raise ValueError(f"doublemask bundle: defense.params.tolerance must be positive, got {self.tolerance}")
        self.local_outputs = self.space == "feature"

    @property
    def needs_exact(self) -> bool:
        """Feature space: the front part's locality holds only on a verified backend. Both spaces: an engine below
        fp32 rounds past the tolerance band."""
        return self.space == "feature" or any(getattr(e, "precision", EXACT_PRECISION) != EXACT_PRECISION
                                              for e in self.engines.values())

    @property
    def required_margin(self) -> float:
        """The margin every copy's gap must exceed: 0 on a verified backend, ``tolerance`` on any other."""
        return 0.0 if self.trusted else self.tolerance

    def batch_atol(self) -> float:
        """Pixel space on an unverified backend: half the tolerance (a gap moves by twice that); else bit for bit."""
        return self.tolerance / 2 if self.space == "pixel" and not self.trusted else 0.0

    @property
    def masks(self) -> np.ndarray:
        """bool (K, H, W) pixel masks, or (K', H', W') feature masks: what is masked for this threat."""
        return _masks(self.input_hw, str(self.threat), self.stride, self.geometry)[0]

    @property
    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """The two-mask pairs of :attr:`masks` in the order certification checks them (:func:`pair_order`)."""
        return _masks(self.input_hw, str(self.threat), self.stride, self.geometry)[1]

    def output_shapes(self, role: str = "model") -> tuple[tuple[int, ...], ...] | None:
        return None if role == "front" else ((len(self.classes),),)

    def local_features(self, x: np.ndarray) -> np.ndarray:
        """The front part's feature map, (N, H', W', C') (feature space only)."""
        if self.space != "feature":
            raise NotImplementedError("doublemask: a pixel-space bundle has no local outputs to probe")
        return self._front(x).transpose(0, 2, 3, 1)

    def _front(self, x: np.ndarray) -> np.ndarray:
        out = self.run_engine(x, role="front")
        out = out[0] if isinstance(out, tuple) else out
        if out.ndim != 4 or out.shape[2:] != self.geometry.output_hw:
            raise EngineRunError(f"front engine output has shape {out.shape}, expected "
                                 f"(N, C', {self.geometry.output_hw[0]}, {self.geometry.output_hw[1]})")
        return out

    def infer(self, x: np.ndarray) -> DoubleMaskFeatures:
        base, role = (x, "model") if self.space == "pixel" else (self._front(x), "back")
        masks, (i, j), twin = _masks(self.input_hw, str(self.threat), self.stride, self.geometry)
        n, k = len(x), len(masks)
        ks = np.arange(k)
        one = self._masked_logits(base, masks, role, np.repeat(np.arange(n), k), np.tile(ks, n), np.tile(ks, n))
        one = one.reshape(n, k, -1)
        preds = one.argmax(axis=-1)
        labels = np.array([majority(p) for p in preds], dtype=np.int64)
        two, two_gap = np.full((n, len(i)), -1, dtype=np.int64), np.zeros((n, len(i)), dtype=np.float32)
        rows = np.full(n, k, dtype=np.int64)

        def run(frames: np.ndarray, pairs: np.ndarray) -> None:
            """Fill the pairs' predictions and gaps. A copy equal to an earlier one (its twin, see :func:`twins`) is
            read from it, not run again: the export probes the engine to give a copy the same bits in any batch."""
            source = twin[pairs]
            target = np.where(source >= k, source - k, pairs)  # the pair whose copy is run
            ran = (source < 0) | ((source >= k) & (two[frames, target] < 0))
            if ran.any():
                f, p = np.unique(np.stack([frames[ran], target[ran]]), axis=1)
                logits = self._masked_logits(base, masks, role, f, i[p], j[p])
                two[f, p], two_gap[f, p] = logits.argmax(axis=-1), gaps(logits, labels[f])
                np.add.at(rows, f, 1)
            on_one, on_pair = (source >= 0) & (source < k), source >= k
            f, p, m = frames[on_one], pairs[on_one], source[on_one]
            two[f, p], two_gap[f, p] = preds[f, m], gaps(one[f, m], labels[f])
            f, p, q = frames[on_pair], pairs[on_pair], target[on_pair]
            two[f, p], two_gap[f, p] = two[f, q], two_gap[f, q]

        if self.options.early_exit:
            agree = (preds == labels[:, None]).all(axis=1)
            checked = agree & (gaps(one, labels[:, None]).min(axis=1) > 0)
            self._check_in_order(run, np.nonzero(self._inference_pairs(preds, labels, i, j)), np.flatnonzero(checked),
                                 two_gap, self._rows_per_call(role, base))
        else:
            run(np.repeat(np.arange(n), len(i)), np.tile(np.arange(len(i)), n))
        return DoubleMaskFeatures(one, two, two_gap, rows)

    @staticmethod
    def _inference_pairs(preds: np.ndarray, labels: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """(N, P) bool: for frames whose first round disagrees, the pairs of the masks that disagree with the
        majority (the second rounds inference reads)."""
        disagree = preds != labels[:, None]
        ran = disagree[:, i] | disagree[:, j]
        ran[~disagree.any(axis=1)] = False
        return ran

    @staticmethod
    def _check_in_order(run, inference: tuple[np.ndarray, np.ndarray], alive: np.ndarray, two_gap: np.ndarray,
                        rows_per_call: int) -> None:
        """Run the ``inference`` (frames, pairs) and check the pairs of the ``alive`` frames in order, a block of
        about ``rows_per_call`` rows at a time; a frame leaves at its first pair without a strict margin."""
        frames, pairs = inference
        start, total = 0, two_gap.shape[1]
        while len(frames) or (len(alive) and start < total):
            block = np.arange(start, min(total, start + max(1, rows_per_call // max(len(alive), 1))))
            if len(alive) and len(block):
                frames = np.concatenate([frames, np.repeat(alive, len(block))])
                pairs = np.concatenate([pairs, np.tile(block, len(alive))])
            run(frames, pairs)
            alive = alive[(two_gap[alive[:, None], block] > 0).all(axis=1)] if len(block) else alive[:0]
            frames, pairs, start = frames[:0], pairs[:0], start + len(block)

    def _rows_per_call(self, role: str, base: np.ndarray) -> int:
        return rows_per_call(base[0].nbytes, cpu=self.engines[role].name.endswith("-cpu"))

    def _masked_logits(self, base: np.ndarray, masks: np.ndarray, role: str, frames: np.ndarray, a: np.ndarray,
                       b: np.ndarray) -> np.ndarray:
        """Logits of ``base[frames[r]]`` under masks ``a[r]`` and ``b[r]`` (a == b: one mask), row by row; the
        copies are built by one vectorized operation per engine call (:meth:`_rows_per_call` rows), on the engine's
        device where it can (``device_copies``)."""
        step = self._rows_per_call(role, base)
        on_device = self.options.device_copies and isinstance(self.engines[role], DeviceMasking)
        parts = [np.zeros((0, len(self.classes)), dtype=np.float32)]
        for s in range(0, len(frames), step):
            f, ma, mb = frames[s:s + step], a[s:s + step], b[s:s + step]
            if on_device:
                out = self.call_engine(role, len(f), lambda e: e.run_masked(base, masks, f, ma, mb, self.mask_value))
            else:
                out = self.run_engine(masked_copies(base, masks[ma] | masks[mb], f, self.mask_value), role=role)
            parts.append(np.asarray(out[0] if isinstance(out, tuple) else out, dtype=np.float32))
        return np.concatenate(parts)

    def decide(self, features: DoubleMaskFeatures, options: DoubleMaskOptions) -> list[Decision]:
        """Inference label (PatchCleanser's three cases) and certificate for every frame."""
        one, k = features.one, features.one.shape[1]
        p1 = one.argmax(axis=-1)
        i, j = self.pairs
        decisions = []
        for f in range(len(one)):
            table = np.full((k, k), -1, dtype=np.int64)
            table[i, j] = table[j, i] = features.two[f]
            table[np.arange(k), np.arange(k)] = p1[f]
            label, case = recover(p1[f], table)
            margin = float(gaps(one[f], label).min())
            if case == 1 and margin > 0:
                margin = min(margin, _pair_margin(features.two[f], features.two_gap[f]))
            rect = RectCert(margin > self.required_margin, margin + 0.0)  # no -0.0
            cert = Certificate.from_rects(str(self.threat), {key: rect for key in self.threat.keys})
            decisions.append(Decision(label=label, certificate=cert,
                                      scores=np.bincount(p1[f], minlength=one.shape[-1]).astype(float).tolist()))
        return decisions


def _pair_margin(two: np.ndarray, two_gap: np.ndarray) -> float:
    """The smallest gap of the pairs in check order up to the first without a strict margin (all when none):
    inf without pairs. Raises when one of those pairs was not run."""
    failed = np.flatnonzero((two >= 0) & (two_gap <= 0))
    read = slice(0, failed[0] + 1 if len(failed) else len(two))
    if (two[read] < 0).any():
        raise ValueError("doublemask features: a frame whose first round agrees lacks two-mask copies")
    return float(two_gap[read].min(initial=np.inf))
