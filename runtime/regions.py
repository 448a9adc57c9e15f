"""Regions of interest: a detector's boxes, cut from the camera frame and certified as model inputs.

``certifier(frames, rois=...)`` takes boxes ``(x0, y0, x1, y1)`` in frame pixels (x to the right, y down, x1 and
y1 exclusive; fractional coordinates are rounded outwards). Every valid box of every frame is cut, resized to the
model input as the manifest says, and certified in one batched call per model threat; a box that is not finite,
empty, outside its frame or smaller than the bundle's ``input.min_roi`` (default 8 pixels) gets a ``fail-safe``
verdict with the reason, and the other boxes are unaffected. Each verdict carries its ``frame`` (the index in the
batch) and its ``roi`` (the pixel box that was cut).

A camera-pixel threat (``24x24@camera``) is mapped through each box's resize (:mod:`certinfer.runtime.camera`);
the certificate names both (``threat``, ``model_threat``). Without boxes, a camera threat is mapped through the
whole frame's resize. A box whose mapped threat no certificate can hold (the patch reaches the whole model input,
or the defense refuses the rectangle) is answered ``uncertified`` with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from certinfer.runtime import camera
from certinfer.runtime.frames import resize, validate_frames
from certinfer.runtime.verdict import Certificate, Verdict

MIN_ROI = 8  # default smallest box side (pixels) a bundle accepts; a bundle may declare ``input.min_roi``
Box = tuple[int, int, int, int]


class RoiError(ValueError):
    """Boxes that do not fit the frames they were given with (their number or their layout)."""


@dataclass
class Region:
    """One box of one frame: the pixel box cut, or why it cannot be."""

    frame: int
    box: Box | None
    given: list[float]
    reason: str = ""


def check_box(box: Sequence[float], frame_hw: tuple[int, int], min_side: int) -> Box | str:
    """The pixel box ``(x0, y0, x1, y1)`` to cut (rounded outwards), or why the box is refused."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return "invalid box: coordinates must be finite numbers"
    px = (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))
    h, w = frame_hw
    if px[0] < 0 or px[1] < 0 or px[2] > w or px[3] > h:
        return f"invalid box: {_fmt(box)} is not inside the {w}x{h} frame"
    if px[2] - px[0] < min_side or px[3] - px[1] < min_side:
        return f"invalid box: {_fmt(box)} is smaller than {min_side}x{min_side} pixels"
    return px


def _fmt(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def per_frame(rois, n: int) -> list[np.ndarray]:
    """The boxes of each of ``n`` frames as (K, 4) float arrays: ``rois`` lists one box list per frame, or, for
    a single frame, its boxes directly."""
    if n == 1 and _boxes(rois) is not None:
        return [_boxes(rois)]
    if not isinstance(rois, Sequence) and not isinstance(rois, np.ndarray) or len(rois) != n:
        raise RoiError(f"rois: give one list of (x0, y0, x1, y1) boxes per frame ({n} frames)")
    out = []
    for i, r in enumerate(rois):
        boxes = _boxes(r)
        if boxes is None:
            raise RoiError(f"rois of frame {i}: expected a list of (x0, y0, x1, y1) boxes")
        out.append(boxes)
    return out


def _boxes(r) -> np.ndarray | None:
    try:
        a = np.asarray(r, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if a.size == 0:
        return np.zeros((0, 4))
    return a if a.ndim == 2 and a.shape[1] == 4 else None


class RegionCalls:
    """``__call__(frames, rois=None)`` for a certifier that has ``certify_frames(frames) -> list[Verdict]``,
    ``with_options(threat=...)``, ``threat``, ``default_threat`` (a model-pixel spec that labels the boxes a camera
    threat cannot be certified for), ``input_hw``, ``min_roi`` and ``engine``."""

    def __call__(self, frames: np.ndarray, rois=None) -> list[Verdict]:
        if rois is None and not self.threat.camera:
            return self.certify_frames(frames)
        return certify_regions(self, frames, rois)


def regions(frames: np.ndarray, rois, min_side: int) -> list[Region]:
    """Every box of every frame, checked; without ``rois``, each whole frame."""
    n, h, w = frames.shape[:3]
    if rois is None:
        return [Region(i, (0, 0, w, h), []) for i in range(n)]
    out = []
    for i, boxes in enumerate(per_frame(rois, n)):
        for b in boxes:
            checked = check_box(b, (h, w), min_side)
            given = [float(v) for v in b]
            out.append(Region(i, None, given, checked) if isinstance(checked, str) else Region(i, checked, given))
    return out


def cut(frame: np.ndarray, box: Box, hw: tuple[int, int]) -> np.ndarray:
    """The box's pixels resized to the model input (the same resize a whole frame gets)."""
    x0, y0, x1, y1 = box
    return resize(np.ascontiguousarray(frame[y0:y1, x0:x1])[None], hw)[0]


def certify_regions(certifier, frames: np.ndarray, rois) -> list[Verdict]:
    """One verdict per box (per frame without ``rois``), in frame then box order (see the module docstring)."""
    frames = validate_frames(frames)
    found = regions(frames, rois, certifier.min_roi)
    verdicts: dict[int, Verdict] = {}
    groups: dict[str, list[int]] = {}
    refused: dict[int, str] = {}
    for k, r in enumerate(found):
        if r.reason:
            verdicts[k] = Verdict.fail_safe(r.reason, backend=certifier.engine.name)
            continue
        spec, why = _model_threat(certifier, r.box)
        groups.setdefault(spec, []).append(k)
        if why:
            refused[k] = why
    for spec, members in groups.items():
        twin = certifier.with_options(threat=spec) if spec != str(certifier.threat) else certifier
        crops = np.stack([cut(frames[found[k].frame], found[k].box, certifier.input_hw) for k in members])
        for k, v in zip(members, twin.certify_frames(crops)):
            verdicts[k] = _refused(v, refused[k], certifier.threat) if k in refused else v
    return [_placed(verdicts[k], r, certifier.threat, rois is not None) for k, r in enumerate(found)]


def _model_threat(certifier, box: Box) -> tuple[str, str]:
    """The model-pixel threat to certify a box against, and why no certificate can hold ("" when one can)."""
    if not certifier.threat.camera:
        return str(certifier.threat), ""
    src = (box[3] - box[1], box[2] - box[0])
    try:
        mapped = str(camera.to_model(certifier.threat, src, certifier.input_hw))
        certifier.with_options(threat=mapped)
        return mapped, ""
    except ValueError as e:  # ThreatError, or the defense refuses the rectangle
        return certifier.default_threat, f"not certifiable: {e}"


def _refused(v: Verdict, why: str, threat) -> Verdict:
    """The verdict's label with no certificate: the camera threat cannot be certified for this box."""
    if v.status != "fail-safe":
        kind = v.certificate.kind if v.certificate is not None else "recovery"
        v.certificate = Certificate(threat=str(threat), certified=False, per_rect={}, kind=kind)
        v.status, v.reason = "uncertified", why
    return v


def _placed(v: Verdict, r: Region, threat, with_boxes: bool) -> Verdict:
    """The verdict with its frame index, its box and, for a camera threat, both threats named."""
    v.frame = v.frame or str(r.frame)
    if with_boxes:
        finite = all(math.isfinite(x) for x in r.given)
        v.roi = list(r.box) if r.box is not None else [round(x, 2) for x in r.given] if finite else None
    if threat.camera and v.certificate is not None and v.certificate.threat != str(threat):
        v.certificate.model_threat = v.certificate.threat
        v.certificate.threat = str(threat)
    return v
