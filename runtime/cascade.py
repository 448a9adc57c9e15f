"""Several certifiers in order on the same frames, under a rule that keeps their certificates sound together.

Stages run in order, each on the frames no earlier stage settled, one batched call per stage. A frame is settled
by the first stage that certifies it, alerts, fails, or predicts another class than the stages before it. The
cascade's answer for a frame (labels compared by class name):

- a stage answers ``alert`` -> ``alert``; a stage answers ``fail-safe`` -> ``fail-safe``;
- stage i certifies z and every stage before it (all uncertified) predicted z -> ``certified`` z;
- the stages that ran predicted different classes -> ``alert`` (the reason names them);
- no stage certifies and all predicted z -> ``uncertified`` z (``fail-safe`` with ``on_uncertified="fail-safe"``).

"The first stage that certifies decides" is not sound: a patch can make an earlier stage certify another label.
The agreement rule is: a certified answer y on x means every patched x' gets y, ``alert`` or ``fail-safe``
(the proof is in ``docs/guarantees.md``, section Cascade). It needs deterministic stages (randomized ones are
refused) and the same stages on x and x': with ``deadline_ms``, which stages run is planned before the frames
are seen, from each stage's latency estimate alone (:meth:`Cascade.plan`).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from certinfer.threat import Threat, parse
from certinfer.runtime.certifier import EngineRunError, withdrawn
from certinfer.runtime.frames import resize, validate_frames
from certinfer.runtime.regions import MIN_ROI, RegionCalls
from certinfer.runtime.verdict import Certificate, Verdict

ALPHA = 0.25  # weight of the newest measurement in a stage's latency estimate
RETRY = 32  # calls in a row that skip a stage before its estimate returns to its warm-up measurement
ON_UNCERTIFIED = ("uncertified", "fail-safe")
TIMINGS = ("prepare", "engine", "certify", "total")


@dataclass
class _Ran:
    """One stage's verdict on one frame, its label mapped to the cascade's classes."""

    stage: int
    name: str
    verdict: Verdict
    label: int
    class_name: str


class Latency:
    """Per-stage latency estimates (ms per frame): an exponential moving average of the ``total`` time each
    stage's verdicts report, updated after each call of that stage. Shared by a cascade's variants.

    A skipped stage is not measured, so one slow call could keep it skipped for good: after ``RETRY`` calls in a
    row that skip it, its estimate returns to its warm-up measurement (when that fits, the stage runs again)."""

    def __init__(self, ms: list[float]):
        self.ms, self.warm_up = list(ms), list(ms)
        self.skips = [0] * len(ms)
        self._lock = threading.Lock()

    def record(self, stage: int, verdicts: list[Verdict]) -> None:
        measured = [v.timings_ms["total"] for v in verdicts if "total" in v.timings_ms]
        if measured:
            with self._lock:
                self.ms[stage] += ALPHA * (float(np.mean(measured)) - self.ms[stage])
                self.skips[stage] = 0

    def skipped(self, stages: list[int]) -> None:
        """Count one more call that skipped each of ``stages``."""
        with self._lock:
            for k in stages:
                self.skips[k] += 1
                if self.skips[k] >= RETRY:
                    self.ms[k], self.skips[k] = self.warm_up[k], 0


class Cascade(RegionCalls):
    """Certifiers run in order on the same frames (see the module docstring); ``cascade(frames, rois=None)``.

    ``stages`` is a list of (name, certifier); every stage is bound to ``threat`` (default: the first stage's),
    and all must take the same input size. The cascade's ``classes`` are the first stage's, followed by any
    class name a later stage adds (a stage's labels are mapped by name). ``deadline_ms`` (per frame) skips the
    stages whose latency estimates do not fit (:meth:`plan`); estimates start from a warm-up call per stage on a
    blank frame, made here.
    """

    name = "cascade"
    randomized = False

    def __init__(self, stages: Sequence[tuple[str, Any]], threat: str | Threat | None = None,
                 deadline_ms: float | None = None, on_uncertified: str = "uncertified"):
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        for name, stage in stages:
            if getattr(stage, "randomized", False):
                raise ValueError(f"stage {name}: a randomized defense cannot be a cascade stage (its certificates "
                                 "are drawn per call, and the cascade's soundness needs deterministic stages)")
        sizes = {tuple(stage.input_hw) for _, stage in stages}
        if len(sizes) > 1:
            raise ValueError(f"cascade stages must share one input size, got {sorted(sizes)}")
        self.input_hw: tuple[int, int] = sizes.pop()
        self.deadline_ms, self.on_uncertified = deadline_ms, on_uncertified
        self._check_options()
        self._bind(stages, stages[0][1].threat if threat is None else threat)
        self.classes = list(self.stages[0][1].classes)
        for _, stage in self.stages[1:]:
            self.classes += [c for c in stage.classes if c not in self.classes]
        self._maps = [np.array([self.classes.index(c) for c in stage.classes], np.int64) for _, stage in self.stages]
        self.min_roi = max(int(getattr(stage, "min_roi", MIN_ROI)) for _, stage in self.stages)
        self._latency = Latency([self._warm_up(stage) for _, stage in self.stages])

    def _bind(self, stages: Sequence[tuple[str, Any]], threat: str | Threat) -> None:
        parsed = parse(threat, input_hw=self.input_hw) if isinstance(threat, str) else threat
        self.stages: list[tuple[str, Any]] = [(str(name), stage.with_options(threat=parsed)) for name, stage in stages]
        self.threat: Threat = self.stages[0][1].threat

    def _check_options(self) -> None:
        if self.deadline_ms is not None and not self.deadline_ms >= 0:
            raise ValueError(f"deadline_ms must be >= 0, got {self.deadline_ms}")
        if self.on_uncertified not in ON_UNCERTIFIED:
            raise ValueError(f"on_uncertified must be one of {', '.join(ON_UNCERTIFIED)}, got {self.on_uncertified!r}")

    def _warm_up(self, stage) -> float:
        """A stage's first latency estimate: its second call on a blank frame (the first pays engine set-up), with
        early exit off where the defense has it (a blank frame often exits early: timed so, double masking would
        be estimated at a seventh of what a certified frame costs)."""
        if self.threat.camera:  # certified per box through a model-pixel threat; time the bundle's own
            stage = stage.with_options(threat=self.default_threat)
        if hasattr(getattr(stage, "options", None), "early_exit"):
            stage = stage.with_options(early_exit=False)
        blank = np.zeros((1, *self.input_hw, 3), np.uint8)
        stage.certify_frames(blank)
        return float(stage.certify_frames(blank)[0].timings_ms.get("total", 0.0))

    # --- what the cascade is --------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``detection`` (a certified label may still meet ``alert`` on a patched frame); one stage: its kind."""
        return self.stages[0][1].kind if len(self.stages) == 1 else "detection"

    @property
    def engine(self):
        """The first stage's engine (the backend named by fail-safe verdicts that no stage answered)."""
        return self.stages[0][1].engine

    @property
    def default_threat(self) -> str:
        """The first stage's own threat spec."""
        return self.stages[0][1].default_threat

    @property
    def latency_ms(self) -> dict[str, float]:
        """Each stage's current latency estimate, ms per frame."""
        return {name: ms for (name, _), ms in zip(self.stages, self._latency.ms)}

    def with_options(self, threat: str | Threat | None = None, **changes: Any) -> Cascade:
        """A copy bound to another threat (every stage re-bound, engines and latency estimates shared), and/or
        with another ``deadline_ms`` or ``on_uncertified``."""
        unknown = set(changes) - {"deadline_ms", "on_uncertified"}
        if unknown:
            raise TypeError(f"cascade options are deadline_ms and on_uncertified, not {', '.join(sorted(unknown))}")
        twin = copy.copy(self)
        if threat is not None:
            twin._bind(self.stages, threat)
        for key, value in changes.items():
            setattr(twin, key, value)
        twin._check_options()
        return twin

    def plan(self) -> tuple[list[int], list[str]]:
        """The stages the next call runs (indices) and a note per skipped stage, from the latency estimates and
        ``deadline_ms`` alone: never from a frame, so a patch cannot change which stages judge it. In order, a
        stage runs when its estimate fits what the stages planned before it leave of the deadline."""
        if self.deadline_ms is None:
            return list(range(len(self.stages))), []
        left, run, skipped = self.deadline_ms, [], []
        for k, ((name, _), est) in enumerate(zip(self.stages, list(self._latency.ms))):
            if est <= left:
                run.append(k)
                left -= est
            else:
                skipped.append(f"skipped {name} (est. {est:.1f} ms > {left:.1f} ms left)")
        return run, skipped

    # --- one call -------------------------------------------------------------------------------------------

    def certify_frames(self, frames: np.ndarray) -> list[Verdict]:
        """One verdict per whole frame: each planned stage called once on the frames still unsettled."""
        t0 = time.perf_counter()
        frames = resize(validate_frames(frames), self.input_hw)
        run, skipped = self.plan()
        self._latency.skipped([k for k in range(len(self.stages)) if k not in run])
        resize_ms = (time.perf_counter() - t0) * 1e3 / len(frames)
        if not run:
            reason = f"deadline missed: no stage fits {self.deadline_ms:g} ms; " + "; ".join(skipped)
            return [Verdict.fail_safe(reason, backend=self.engine.name) for _ in frames]
        ran: list[list[_Ran]] = [[] for _ in frames]
        open_ = list(range(len(frames)))
        for k in run:
            for i, r in zip(open_, self._call(k, frames[open_])):
                ran[i].append(r)
            open_ = [i for i in open_ if not _settled(ran[i])]
            if not open_:
                break
        return [self._verdict(r, skipped, resize_ms) for r in ran]

    def _call(self, k: int, frames: np.ndarray) -> list[_Ran]:
        """Stage k's verdicts on ``frames``; an engine failure makes them fail-safe."""
        name, stage = self.stages[k]
        try:
            verdicts = stage.certify_frames(frames)
        except EngineRunError as e:
            verdicts = [Verdict.fail_safe(f"engine error: {e}", backend=stage.engine.name) for _ in frames]
        else:
            self._latency.record(k, verdicts)
        return [self._ran(k, name, v) for v in verdicts]

    def _ran(self, k: int, name: str, v: Verdict) -> _Ran:
        label = int(self._maps[k][v.label]) if 0 <= v.label < len(self._maps[k]) else -1
        return _Ran(k, name, v, label, self.classes[label] if label >= 0 else "")

    def _verdict(self, ran: list[_Ran], skipped: list[str], resize_ms: float) -> Verdict:
        last = ran[-1]
        status, reason = _answer(ran, self.on_uncertified)
        label = ran[0].label if status in ("certified", "uncertified") else -1
        same_classes = list(self.stages[last.stage][1].classes) == self.classes
        timings = {key: sum(r.verdict.timings_ms.get(key, 0.0) for r in ran) for key in TIMINGS}
        timings["prepare"] += resize_ms
        timings["total"] += resize_ms
        return Verdict(label=label, class_name=self.classes[label] if label >= 0 else "", status=status,
                       certificate=self._certificate(last.verdict.certificate, status),
                       scores=last.verdict.scores if same_classes and label >= 0 else None,
                       reason="; ".join(filter(None, [reason, *skipped])), timings_ms=timings,
                       backend=last.verdict.backend, stage=last.name, stages=[_record(r) for r in ran])

    def _certificate(self, cert: Certificate | None, status: str) -> Certificate | None:
        """The deciding stage's certificate, of the cascade's kind; withdrawn unless the cascade certifies."""
        if cert is None or status == "fail-safe":
            return None
        return dataclasses.replace(cert if status == "certified" else withdrawn(cert), kind=self.kind)


def _record(r: _Ran) -> dict:
    return {"stage": r.name, "label": r.label, "class_name": r.class_name, "status": r.verdict.status,
            "timings_ms": dict(r.verdict.timings_ms)}


def _settled(ran: list[_Ran]) -> bool:
    """Whether a frame's answer is known: its last stage did not answer ``uncertified`` with the first's class."""
    return ran[-1].verdict.status != "uncertified" or ran[-1].class_name != ran[0].class_name


def _answer(ran: list[_Ran], on_uncertified: str) -> tuple[str, str]:
    """The cascade's status for one frame and its reason, from the stages that ran (in order)."""
    last = ran[-1]
    status = last.verdict.status
    if status == "fail-safe":
        return "fail-safe", f"{last.verdict.reason} (stage {last.name})"
    if status == "alert":
        return "alert", f"{last.name}: {last.verdict.reason}"
    if any(r.class_name != ran[0].class_name for r in ran):
        return "alert", "stages disagree: " + ", ".join(
            f"{r.name} says {r.class_name or 'no class'!r} ({r.verdict.status})" for r in ran)
    if status == "certified":
        return "certified", ""
    if on_uncertified == "fail-safe":
        return "fail-safe", f"uncertified: no stage certified {last.class_name!r}"
    return "uncertified", last.verdict.reason
