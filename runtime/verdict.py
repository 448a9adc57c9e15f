"""What the runtime returns per frame, and its JSON-lines form."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

Status = Literal["certified", "uncertified", "alert", "fail-safe"]
Kind = Literal["recovery", "detection", "probabilistic"]


@dataclass
class RectCert:
    certified: bool
    margin: float  # slack of the deciding inequality; > 0 exactly when certified


@dataclass
class Certificate:
    threat: str
    certified: bool
    per_rect: dict[str, RectCert]
    kind: Kind = "recovery"
    p: float | None = None
    model_threat: str | None = None  # a camera-pixel threat mapped to model pixels: what was certified (per_rect keys)

    @classmethod
    def from_rects(cls, threat: str, per_rect: dict[str, RectCert], kind: Kind = "recovery",
                   p: float | None = None) -> Certificate:
        """A threat is certified when every one of its rectangles is."""
        return cls(threat=threat, certified=bool(per_rect) and all(r.certified for r in per_rect.values()),
                   per_rect=per_rect, kind=kind, p=p)


@dataclass
class Verdict:
    label: int
    class_name: str
    status: Status
    certificate: Certificate | None = None
    scores: list[float] | None = None
    reason: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    backend: str = ""
    frame: str = ""  # where the frame came from (file name, video index; its index in the batch for boxes)
    roi: list[int] | None = None  # the box (x0, y0, x1, y1) in frame pixels this verdict is about
    roi_id: str = ""  # the detector's id of that box, where it gave one
    stage: str = ""  # in a cascade: the stage (bundle name) that decided
    stages: list[dict] | None = None  # in a cascade: every stage that ran (name, label, status, timings_ms)
    truth: int | None = None  # the frame's true label, where it is known (the packaged sample frames)
    correct: bool | None = None  # whether ``label`` is ``truth``, where the truth is known

    @classmethod
    def fail_safe(cls, reason: str, backend: str = "", frame: str = "",
                  timings_ms: dict[str, float] | None = None) -> Verdict:
        return cls(label=-1, class_name="", status="fail-safe", reason=reason, backend=backend, frame=frame,
                   timings_ms=dict(timings_ms or {}))

    def to_dict(self) -> dict:
        """The verdict as a dict; optional fields that are unset (scores, roi, roi_id, stage, stages, truth, correct)
        are left out."""
        d = asdict(self)
        for key in ("scores", "roi", "stages", "truth", "correct"):
            if d[key] is None:
                d.pop(key)
        for key in ("stage", "roi_id"):
            if not d[key]:
                d.pop(key)
        if d["certificate"] is not None and d["certificate"]["model_threat"] is None:
            d["certificate"].pop("model_threat")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)
