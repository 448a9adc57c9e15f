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
    frame: str = ""  # where the frame came from (file name, video index), set by the stream

    @classmethod
    def fail_safe(cls, reason: str, backend: str = "", frame: str = "",
                  timings_ms: dict[str, float] | None = None) -> Verdict:
        return cls(label=-1, class_name="", status="fail-safe", reason=reason, backend=backend, frame=frame,
                   timings_ms=dict(timings_ms or {}))

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.scores is None:
            d.pop("scores")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)
