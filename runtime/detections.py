"""A detector's boxes for ``certinfer run --rois FILE``: one JSON object per line, one line per frame.

The fields follow ROS 2 ``vision_msgs/Detection2DArray`` (a frame's ``detections``) and ``Detection2D``
(``id``, ``bbox`` with its centre and size in pixels, ``results`` with the detector's hypotheses)::

    {"frame": "scene.jpg", "detections": [
        {"id": "7", "bbox": {"center": {"position": {"x": 220.0, "y": 352.0}, "theta": 0.0},
                             "size_x": 120.0, "size_y": 190.0},
         "results": [{"hypothesis": {"class_id": "traffic sign", "score": 0.91}}]}]}

``frame`` is the frame's name in the stream (an image file's name, ``clip.mp4#12`` for a video frame) or its
0-based position. ``theta`` must be 0: rotated boxes are not supported. ``id`` and ``results`` are optional.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


class DetectionsError(ValueError):
    """A detections file that cannot be read: the message names the line and what is wrong."""


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in frame pixels
    id: str = ""
    class_id: str = ""
    score: float | None = None


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DetectionsError(f"{what} must be a number, got {value!r}")
    return float(value)


def detection(d: dict) -> Detection:
    """One ``Detection2D`` object as a :class:`Detection`."""
    if not isinstance(d, dict) or not isinstance(d.get("bbox"), dict):
        raise DetectionsError("each detection needs a bbox: {center: {position: {x, y}, theta}, size_x, size_y}")
    bbox = d["bbox"]
    center = bbox.get("center")
    position = center.get("position") if isinstance(center, dict) else None
    if not isinstance(position, dict):
        raise DetectionsError("bbox.center.position {x, y} is missing")
    if _number(center.get("theta", 0.0), "bbox.center.theta") != 0.0:
        raise DetectionsError("rotated boxes (theta != 0) are not supported")
    cx, cy = _number(position.get("x"), "bbox.center.position.x"), _number(position.get("y"), "bbox.center.position.y")
    sx, sy = _number(bbox.get("size_x"), "bbox.size_x"), _number(bbox.get("size_y"), "bbox.size_y")
    hypotheses = [r.get("hypothesis", {}) for r in d.get("results", []) if isinstance(r, dict)]
    best = max(hypotheses, key=lambda h: h.get("score", 0.0), default={})
    score = best.get("score")
    return Detection((cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2), str(d.get("id", "")),
                     str(best.get("class_id", "")), float(score) if isinstance(score, (int, float)) else None)


def read(path: str | os.PathLike) -> dict[str | int, list[Detection]]:
    """The detections of every frame in the file, keyed by frame name or position."""
    out: dict[str | int, list[Detection]] = {}
    with open(Path(path), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                frame = row["frame"] if isinstance(row, dict) else None
                if isinstance(frame, bool) or not isinstance(frame, (str, int)):
                    raise DetectionsError('each line needs "frame": a frame name or a 0-based position')
                dets = row.get("detections", [])
                if not isinstance(dets, list):
                    raise DetectionsError('"detections" must be a list')
                out.setdefault(frame, []).extend(detection(d) for d in dets)
            except (json.JSONDecodeError, KeyError, DetectionsError) as e:
                msg = 'each line needs "frame"' if isinstance(e, KeyError) else str(e)
                raise DetectionsError(f"{path}, line {n}: {msg}") from e
    return out

