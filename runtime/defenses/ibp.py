"""IBP certified patch defense (Chiang et al., ICLR 2020): interval bounds for every patch location.

For a patch rectangle at one location the set of patched inputs is a box: pixels inside the patch range over
[0, 1] before normalization, i.e. [(0 - mean) / std, (1 - mean) / std] per channel after it; every other pixel
is fixed at the frame's value. The bundle's ``bounds`` graph propagates such boxes through the network (interval
arithmetic, last layer merged with (e_i - e_j)) and returns lower bounds of z_i - z_j for every class pair.
The label y (from the ``model`` graph) is certified against a rectangle when, at every location,
``min_{j != y} lower(z_y - z_j) > tolerance`` (Eq. 9 and 11).

Soundness. In exact arithmetic the IBP bounds contain every reachable logit difference, and the clean frame
lies in every box, so a positive bound proves the label at every location and with every patch content. A
patch partly outside the input covers a subset of some patch inside it (for rectangles that fit), so the
locations fully inside suffice. Both graphs run in float32: the rounding of the bounds graph and of the model
graph can each move a margin by a little. The tolerance (``defense.params.tolerance``, logit units) absorbs
them: export measures both errors against float64 on real frames at every location and refuses a bundle whose
measured error exceeds a tenth of the tolerance. That check was made on the backends in the manifest's
``probe.exact_backends`` (older bundles: ``defense.params.verified_backends``); either engine on any other
backend (e.g. a GPU kernel using TF32) gives no certificates (``needs_exact``). Bounds engines must be fp32: a
bundle with an fp16 or int8 bounds engine is refused.

Engine input: one array (N, 2C, H, W), the lower image's channels then the upper image's (one input keeps the
engine contract of every backend). Every location of every threat rectangle of a batch of frames is sent to
the bounds engine in chunks of ``chunk`` boxes, built chunk by chunk (a 32x32 frame has 961 2x2 locations,
24 MB of boxes), and reduced to the minimum over locations as they come back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from certinfer.runtime.certifier import Certifier, Decision, Options
from certinfer.runtime.verdict import Certificate, RectCert
from certinfer.threat import Rect, Threat, rect_key

DEFAULT_TOLERANCE = 1e-2  # logits; 90x the float32 rounding measured on the GTSRB CPU model (1.1e-4)
DEFAULT_CHUNK = 1024
BATCH_SHARE = 0.1  # of the tolerance: what an engine output may move between batch sizes (see batch_atol)


def patch_interval(mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (C,) bounds of a patch pixel in model space: pixel values 0 and 1 normalized exactly as
    :meth:`Certifier.prepare` normalizes frames (float32), so every prepared patch value lies between them."""
    mean, std = np.asarray(mean, np.float32).ravel(), np.asarray(std, np.float32).ravel()
    return (np.float32(0.0) - mean) / std, (np.float32(1.0) - mean) / std


def patch_locations(input_hw: tuple[int, int], rect: Rect) -> np.ndarray:
    """(L, 2) top-left corners of a ``rect`` patch at every location fully inside the input, row-major (the order
    of ``certinfer.bench.attacks.locations``)."""
    (height, width), (h, w) = input_hw, rect
    if not (1 <= h <= height and 1 <= w <= width):
        raise ValueError(f"patch {h}x{w} does not fit the {height}x{width} input")
    tops, lefts = np.divmod(np.arange((height - h + 1) * (width - w + 1)), width - w + 1)
    return np.stack([tops, lefts], axis=1)


def interval_inputs(x: np.ndarray, rect: Rect, corners: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Bounds-engine input for patch boxes: frames ``x`` (B, C, H, W), one ``rect`` patch per frame at ``corners``
    (B, 2) -> (B, 2C, H, W). Inside the patch: [lo, hi] per channel; elsewhere both bounds are the frame's value."""
    b, c = x.shape[:2]
    h, w = rect
    out = np.empty((b, 2 * c, *x.shape[2:]), dtype=np.float32)
    out[:, :c] = x
    out[:, c:] = x
    rows = (corners[:, 0, None] + np.arange(h))[:, None, :, None]
    cols = (corners[:, 1, None] + np.arange(w))[:, None, None, :]
    frames, channels = np.arange(b)[:, None, None, None], np.arange(c)[None, :, None, None]
    out[frames, channels, rows, cols] = lo[None, :, None, None]
    out[frames, channels + c, rows, cols] = hi[None, :, None, None]
    return out


def certify(min_margins: dict[str, np.ndarray], labels: np.ndarray, threat: str,
            tolerance: float = DEFAULT_TOLERANCE) -> list[Certificate]:
    """Certificates from lower bounds of z_i - z_j minimized over locations, one (N, K, K) array per rectangle.

    For label y the deciding quantity is ``min_{j != y} lower(z_y - z_j)``; ``margin`` is it minus the
    tolerance, > 0 exactly when certified. Returns one Certificate (kind ``recovery``) per frame.
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    labels = np.asarray(labels)
    worst = {}
    for key, m in min_margins.items():
        rows = np.array(m[np.arange(len(labels)), labels], dtype=np.float64)  # (N, K)
        rows[np.arange(len(labels)), labels] = np.inf
        worst[key] = rows.min(axis=1) - tolerance
    return [Certificate.from_rects(threat, {k: RectCert(bool(w[i] > 0), float(w[i])) for k, w in worst.items()})
            for i in range(len(labels))]


@dataclass(frozen=True)
class IBPOptions(Options):
    """``tolerance``: the float32 rounding slack in logit units; a margin must exceed it to certify."""

    tolerance: float = DEFAULT_TOLERANCE

    def __post_init__(self) -> None:
        if not self.tolerance > 0:
            raise ValueError(f"ibp: tolerance must be positive, got {self.tolerance}")
        object.__setattr__(self, "tolerance", float(self.tolerance))


@dataclass(frozen=True)
class IBPFeatures:
    logits: np.ndarray  # (N, K) from the model engine; the label is their argmax
    min_margins: dict[str, np.ndarray]  # per rectangle key: lower bounds of z_i - z_j over every location, (N, K, K)


class IBPCertifier(Certifier):
    """IBP from a bundle's ``defense.params``: ``tolerance`` (logit units) and ``chunk``; trusted backends from
    ``probe.exact_backends``.

    Two engine roles: ``model`` (normalized frames -> logits, the label) and ``bounds`` (see the module
    docstring), on the same backend. Features: :class:`IBPFeatures`.
    """

    name = "ibp"
    Options = IBPOptions
    roles = ("model", "bounds")
    needs_exact = True

    def batch_atol(self) -> float:
        """A tenth of the tolerance: the export holds the measured float32 rounding to another tenth, so both
        together stay within the tolerance the certificates keep in hand."""
        return BATCH_SHARE * self.options.tolerance

    def __init__(self, bundle, engines, threat: Threat, options: IBPOptions | None = None):
        if any(e["precision"] != "fp32" for e in bundle.engines("bounds")):
            raise ValueError("ibp bundle: bounds engines must be fp32 (reduced precision breaks the interval "
                             "bounds' tolerance); remove the fp16/int8 bounds plan")
        super().__init__(bundle, engines, threat, options)
        self.chunk = int(self.params.get("chunk", DEFAULT_CHUNK))
        if self.chunk < 1:
            raise ValueError(f"ibp bundle: chunk must be positive, got {self.chunk}")
        if len(self.classes) < 2:
            raise ValueError("ibp bundle: needs at least two classes")
        self.patch_lo, self.patch_hi = patch_interval(self._mean, self._std)

    def output_shapes(self, role: str = "model") -> tuple[tuple[int, ...], ...]:
        k = len(self.classes)
        return ((k, k),) if role == "bounds" else ((k,),)

    def min_margins(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Per rectangle key of the threat: lower bounds of z_i - z_j minimized over every location, (N, K, K)."""
        k = len(self.classes)
        out = {}
        for rect in self.threat.rects:
            corners = patch_locations(self.input_hw, rect)
            frames, locs = np.divmod(np.arange(len(x) * len(corners)), len(corners))  # frame-major rows
            best = np.full((len(x), k, k), np.inf, dtype=np.float32)
            for start in range(0, len(frames), self.chunk):
                f, l = frames[start:start + self.chunk], locs[start:start + self.chunk]
                bounds = self.run_engine(interval_inputs(x[f], rect, corners[l], self.patch_lo, self.patch_hi),
                                         role="bounds")
                bounds = bounds[0] if isinstance(bounds, tuple) else bounds
                cuts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])  # contiguous rows per frame
                best[f[cuts]] = np.minimum(best[f[cuts]], np.minimum.reduceat(bounds, cuts, axis=0))
            out[rect_key(rect)] = best
        return out

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The model engine's logits (N, K) for prepared frames; their argmax is the certifier's label."""
        out = self.run_engine(x)
        return out[0] if isinstance(out, tuple) else out

    def infer(self, x: np.ndarray) -> IBPFeatures:
        return IBPFeatures(self.logits(x), self.min_margins(x))

    def decide(self, features: IBPFeatures, options: IBPOptions) -> list[Decision]:
        logits = features.logits
        labels = logits.argmax(axis=-1)
        certs = certify(features.min_margins, labels, str(self.threat), options.tolerance)
        return [Decision(label=int(labels[i]), certificate=certs[i], scores=logits[i].astype(float).tolist())
                for i in range(len(labels))]
