"""The cascade: its agreement rule against the naive one, every small world of scripted stages, a real patch
attack on golden bundles, deadline planning, and its verdicts."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import certinfer
from certinfer.runtime.cascade import ALPHA, RETRY, Cascade
from certinfer.runtime.certifier import Certifier, EngineRunError
from certinfer.runtime.verdict import Certificate, RectCert, Verdict
from certinfer.threat import parse

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CLASSES = ["stop", "yield", "speed"]
HW = (2, 2)
Script = Callable[[np.ndarray], tuple[str, int]]


class Toy:
    """A scripted stage: ``script(frame) -> (status, label)``, reporting ``ms(frame)`` per frame."""

    randomized = False
    min_roi = 8
    input_hw = HW
    default_threat = "1x1"
    engine = SimpleNamespace(name="toy")

    def __init__(self, script: Script, classes: list[str] = CLASSES, kind: str = "detection",
                 ms: float | Callable[[np.ndarray], float] = 1.0):
        self.script, self.classes, self.kind = script, classes, kind
        self.ms = ms if callable(ms) else (lambda f, v=float(ms): v)
        self.threat = parse("1x1", input_hw=HW)
        self.calls: list[int] = []  # frames per call, shared with the copies
        self._certs = {s: Certificate.from_rects("1x1", {"1x1": RectCert(s == "certified", 1.0 if s == "certified"
                                                                         else -1.0)}, kind=kind)
                       for s in ("certified", "uncertified", "alert")}

    def with_options(self, threat=None) -> Toy:
        twin = copy.copy(self)
        if threat is not None:
            twin.threat = parse(threat, input_hw=HW) if isinstance(threat, str) else threat.bind(HW)
        return twin

    def certify_frames(self, frames: np.ndarray) -> list[Verdict]:
        self.calls.append(len(frames))
        return [self._verdict(f) for f in frames]

    def _verdict(self, frame: np.ndarray) -> Verdict:
        status, label = self.script(frame)
        ms = self.ms(frame)
        timings = {"prepare": 0.0, "engine": ms, "certify": 0.0, "total": ms}
        if status == "fail-safe":
            return Verdict.fail_safe("engine error: scripted", backend="toy", timings_ms=timings)
        label = -1 if status == "alert" else label
        return Verdict(label=label, class_name=self.classes[label] if label >= 0 else "", status=status,
                       certificate=self._certs[status], reason="patch detected" if status == "alert" else "",
                       timings_ms=timings, backend="toy")


def frame(*pixels: int) -> np.ndarray:
    """One (2, 2, 3) frame whose first pixels are ``pixels`` (the scripts read them)."""
    f = np.zeros(12, np.uint8)
    f[:len(pixels)] = pixels
    return f.reshape(*HW, 3)


def by_pixel(table: dict[int, tuple[str, int]]) -> Script:
    """A script answering by the frame's first pixel value (0: the warm-up's blank frame)."""
    return lambda f: table.get(int(f.flat[0]), ("uncertified", 0))


X, X_PATCHED = 1, 2
STOP, YIELD = 0, 1


def naive(stages: list[Toy], f: np.ndarray) -> tuple[str, int]:
    """The unsound rule: the first stage that certifies (or alerts) decides; else the first stage's label."""
    answers = [stage.script(f) for stage in stages]
    return next((a for a in answers if a[0] != "uncertified"), answers[0])


# --- (1) the case that breaks the naive rule ---------------------------------------------------------------------

def test_the_naive_rule_flips_where_the_cascade_alerts():
    """Stage 1 is uncertified 'stop' on x, stage 2 certifies 'yield' on x; a patch makes stage 1 certify 'stop'.
    Every stage keeps its own guarantee (stage 2 still says 'yield' on x'; stage 1's certificate on x' holds on
    x, where it says 'stop'), yet the naive cascade certifies 'yield' on x and 'stop' on x'."""
    one = Toy(by_pixel({X: ("uncertified", STOP), X_PATCHED: ("certified", STOP)}), kind="recovery")
    two = Toy(by_pixel({X: ("certified", YIELD), X_PATCHED: ("uncertified", YIELD)}), kind="recovery")
    x, x_patched = frame(X), frame(X_PATCHED)
    assert naive([one, two], x) == ("certified", YIELD)
    assert naive([one, two], x_patched) == ("certified", STOP)
    on_x, on_patched = Cascade([("one", one), ("two", two)]).certify_frames(np.stack([x, x_patched]))
    assert on_x.status == "alert" and on_x.label == -1
    assert "stages disagree" in on_x.reason and "one says 'stop'" in on_x.reason and "two says 'yield'" in on_x.reason
    assert (on_patched.status, on_patched.label, on_patched.stage) == ("certified", STOP, "one")


# --- (2) every small world ----------------------------------------------------------------------------------------

Outcome = tuple[str, int]


def _outcomes(labels: int) -> list[Outcome]:
    return [(s, y) for s in ("certified", "uncertified") for y in range(labels)] + [("alert", -1)]


def _keeps(a: Outcome, b: Outcome) -> bool:
    """A detection (or recovery) certificate on one side holds on the other: certified z -> z or alert."""
    return a[0] != "certified" or b[1] == a[1] or b[0] == "alert"


def stage_behaviours(labels: int) -> list[tuple[Outcome, Outcome]]:
    """Every (verdict on x, verdict on x') a deterministic stage can give: certificates hold both ways (x is a
    patched x' too), recovery behaviours being the ones without alert; an engine may fail on either side."""
    pairs = [(a, b) for a in _outcomes(labels) for b in _outcomes(labels) if _keeps(a, b) and _keeps(b, a)]
    failed = ("fail-safe", -1)
    return pairs + [(failed, o) for o in _outcomes(labels)] + [(o, failed) for o in _outcomes(labels)] + [
        (failed, failed)]


def _world_stage(behaviours: np.ndarray, table: list[tuple[Outcome, Outcome]]) -> Toy:
    """A stage answering frame (world w, side s) with ``table[behaviours[w]][s]``; the world id is in 3 bytes."""
    def script(f: np.ndarray) -> Outcome:
        w = int(f.flat[0]) | int(f.flat[1]) << 8 | int(f.flat[2]) << 16
        return table[behaviours[w]][int(f.flat[3])] if w else ("uncertified", 0)
    return Toy(script)


@pytest.mark.parametrize("n_stages, labels", [(2, 3), (3, 2)])
def test_no_world_of_scripted_stages_flips_a_cascade_certificate(n_stages: int, labels: int):
    """Over every combination of stage behaviours, a frame the cascade certifies y gets y, alert or fail-safe
    once patched (world 0 is the warm-up's); the naive rule flips in some of the same worlds."""
    table = stage_behaviours(labels)
    worlds = np.array(list(itertools.product(range(len(table)), repeat=n_stages)))
    worlds = np.concatenate([worlds[:1], worlds])  # world ids start at 1: 0 answers the blank warm-up frame
    stages = [_world_stage(worlds[:, s], table) for s in range(n_stages)]
    cascade = Cascade([(f"s{s}", stage) for s, stage in enumerate(stages)])
    ids = np.arange(1, len(worlds))
    frames = np.zeros((len(ids), 2, 12), np.uint8)
    frames[:, :, 0], frames[:, :, 1], frames[:, :, 2] = ids[:, None] & 255, ids[:, None] >> 8 & 255, ids[:, None] >> 16
    frames[:, 1, 3] = 1
    frames = frames.reshape(-1, *HW, 3)
    verdicts = cascade.certify_frames(frames)
    flips, naive_flips, certified = [], 0, 0
    for w, (on_x, on_patched) in zip(ids, zip(verdicts[::2], verdicts[1::2])):
        for a, b in ((on_x, on_patched), (on_patched, on_x)):  # x is a patched x' as well
            if a.status == "certified":
                certified += 1
                if b.status in ("certified", "uncertified") and b.label != a.label:
                    flips.append([table[k] for k in worlds[w]])
        x, patched = frames[2 * (w - 1)], frames[2 * (w - 1) + 1]
        n_x, n_patched = naive(stages, x), naive(stages, patched)
        naive_flips += n_x[0] == n_patched[0] == "certified" and n_x[1] != n_patched[1]
    assert not flips, f"{len(flips)} worlds flip a certified label, e.g. {flips[:3]}"
    assert certified > 0 and naive_flips > 0


# --- (3) a real attack on golden bundles ----------------------------------------------------------------------------

def _patched(f: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """``f`` with an h x w patch at every location, in random, black and white content."""
    H, W = f.shape[:2]
    out = []
    for top, left in itertools.product(range(H - h + 1), range(W - w + 1)):
        for content in (rng.integers(0, 256, (h, w, 3)), 0, 255):
            g = f.copy()
            g[top:top + h, left:left + w] = content
            out.append(g)
    return np.stack(out)


@pytest.mark.slow
def test_patches_at_every_location_never_flip_a_certified_frame():
    """masking-ds then masking-bn (16x16, deterministic, threat 2x2): for each certified frame among the golden,
    solid-coloured and some random frames, a 2x2 patch at every location, random, black or white, never gives
    another label without an alert."""
    cascade = certinfer.load([GOLDEN / "bundles" / "masking-ds", GOLDEN / "bundles" / "masking-bn"],
                             backend="onnxruntime-cpu", threat="2x2")
    rng = np.random.default_rng(0)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [200, 30, 30], [30, 200, 30]])
    with np.load(GOLDEN / "frames.npz", allow_pickle=False) as f:
        frames = np.concatenate([f["16x16"], rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
                                 np.broadcast_to(colours[:, None, None].astype(np.uint8), (6, 16, 16, 3))])
    verdicts = cascade(frames)
    chosen = [i for i, v in enumerate(verdicts) if v.status == "certified"]
    assert {verdicts[i].stage for i in chosen} == {str(GOLDEN / "bundles" / "masking-bn"),
                                                   str(GOLDEN / "bundles" / "masking-ds")}
    assert any(v.status == "alert" for v in verdicts)
    flips = []
    for i in chosen:
        for v in cascade(_patched(frames[i], 2, 2, rng)):
            if v.status in ("certified", "uncertified") and v.label != verdicts[i].label:
                flips.append((i, v.label, v.status))
    assert not flips


# --- (4) deadline planning ----------------------------------------------------------------------------------------------

def _slow_on_bright(ms: float) -> Callable[[np.ndarray], float]:
    """A stage's reported latency: ``ms``, ten times that on a frame whose first pixel is 200 or more."""
    return lambda f: ms * 10 if f.flat[0] >= 200 else ms


def test_deadline_skips_a_stage_that_does_not_fit_and_names_it():
    fast = Toy(by_pixel({X: ("uncertified", STOP)}), ms=10)
    slow = Toy(by_pixel({X: ("certified", STOP)}), ms=460)
    cascade = Cascade([("default", fast), ("doublemask-gtsrb", slow)], deadline_ms=130)
    assert cascade.latency_ms == {"default": 10.0, "doublemask-gtsrb": 460.0}  # the warm-ups' reports
    assert cascade.plan() == ([0], ["skipped doublemask-gtsrb (est. 460.0 ms > 120.0 ms left)"])
    (v,) = cascade.certify_frames(frame(X)[None])
    assert (v.status, v.label, v.stage) == ("uncertified", STOP, "default")
    assert v.reason == "skipped doublemask-gtsrb (est. 460.0 ms > 120.0 ms left)"
    assert [s["stage"] for s in v.stages] == ["default"] and slow.calls == [1, 1]  # the warm-up's two calls only
    (v,) = cascade.with_options(deadline_ms=None).certify_frames(frame(X)[None])
    assert (v.status, v.stage, v.reason) == ("certified", "doublemask-gtsrb", "")


class _EarlyExit(Toy):
    """A stage with an ``early_exit`` option: 30 ms per frame with it (the blank frame exits early), 300 without."""

    def __init__(self):
        super().__init__(by_pixel({X: ("certified", STOP)}), ms=30.0)
        self.options = SimpleNamespace(early_exit=True)

    def with_options(self, threat=None, early_exit=None) -> Toy:
        twin = super().with_options(threat)
        if early_exit is not None:
            twin.options = SimpleNamespace(early_exit=early_exit)
            twin.ms = lambda f: 30.0 if early_exit else 300.0
        return twin


def test_the_warm_up_times_the_slowest_path():
    """A blank frame takes a defense's early exit; the first estimate must be what a certified frame costs."""
    stage = _EarlyExit()
    cascade = Cascade([("fast", Toy(by_pixel({}), ms=10)), ("early-exit", stage)], deadline_ms=100)
    assert cascade.latency_ms == {"fast": 10.0, "early-exit": 300.0}
    assert cascade.plan() == ([0], ["skipped early-exit (est. 300.0 ms > 90.0 ms left)"])
    assert dict(cascade.stages)["early-exit"].options.early_exit  # the stage itself keeps its early exit


def test_no_stage_fits_is_fail_safe():
    cascade = Cascade([("a", Toy(by_pixel({}), ms=5)), ("b", Toy(by_pixel({}), ms=3))], deadline_ms=2)
    (v,) = cascade.certify_frames(frame(X)[None])
    assert v.status == "fail-safe" and v.reason.startswith("deadline missed: no stage fits 2 ms")
    assert "skipped a (est. 5.0 ms > 2.0 ms left)" in v.reason and "skipped b (est. 3.0 ms > 2.0 ms left)" in v.reason


def test_the_plan_never_depends_on_the_frame():
    """A frame that makes stage one slow (400 ms against a 100 ms deadline) is judged by the same stages as one
    that does not, alone or in the same call; only later calls see the moving average move, the same way in
    twin cascades with the same history."""
    def build() -> Cascade:
        one = Toy(by_pixel({X: ("uncertified", STOP), 200: ("uncertified", STOP)}), ms=_slow_on_bright(40))
        two = Toy(by_pixel({X: ("certified", STOP), 200: ("certified", STOP)}), ms=50)
        return Cascade([("one", one), ("two", two)], deadline_ms=100)
    x, bright = frame(X), frame(200)
    (vx,) = build().certify_frames(x[None])
    (vb,) = build().certify_frames(bright[None])
    assert [s["stage"] for s in vx.stages] == [s["stage"] for s in vb.stages] == ["one", "two"]
    twin_a, twin_b = build(), build()
    both = twin_a.certify_frames(np.stack([x, bright]))
    assert [[s["stage"] for s in v.stages] for v in both] == [["one", "two"]] * 2
    assert twin_a.latency_ms == {"one": pytest.approx(40 + ALPHA * (220 - 40)), "two": 50.0}  # 220: the call's mean
    assert twin_a.plan() == ([0], ["skipped two (est. 50.0 ms > 15.0 ms left)"])
    twin_b.certify_frames(np.stack([x, bright]))
    assert twin_b.latency_ms == twin_a.latency_ms


def test_a_stage_skipped_after_one_slow_call_is_retried():
    """One slow call (400 ms against a 100 ms deadline) lifts stage one's estimate over the deadline; after RETRY
    calls that skip it, its estimate is its warm-up's again and it runs."""
    one = Toy(by_pixel({X: ("uncertified", STOP), 200: ("uncertified", STOP)}), ms=_slow_on_bright(40))
    two = Toy(by_pixel({X: ("certified", STOP)}), ms=50)
    cascade = Cascade([("one", one), ("two", two)], deadline_ms=100)
    cascade.certify_frames(frame(200)[None])
    assert cascade.latency_ms["one"] == pytest.approx(40 + ALPHA * (400 - 40))
    for _ in range(RETRY):
        (v,) = cascade.certify_frames(frame(X)[None])
        assert [s["stage"] for s in v.stages] == ["two"] and "skipped one" in v.reason
    assert cascade.latency_ms["one"] == 40.0
    (v,) = cascade.certify_frames(frame(X)[None])
    assert [s["stage"] for s in v.stages] == ["one", "two"] and v.status == "certified"


# --- (5) stages, verdicts, loading ---------------------------------------------------------------------------------

def test_a_randomized_stage_is_refused():
    coin = Toy(by_pixel({}))
    coin.randomized = True
    with pytest.raises(ValueError, match="randomized"):
        Cascade([("a", Toy(by_pixel({}))), ("coin", coin)])


def test_stages_must_share_the_input_size():
    other = Toy(by_pixel({}))
    other.input_hw = (4, 4)
    with pytest.raises(ValueError, match="input size"):
        Cascade([("a", Toy(by_pixel({}))), ("b", other)])


def test_a_stage_alert_or_failure_settles_the_frame():
    one = Toy(by_pixel({1: ("alert", -1), 2: ("fail-safe", -1), 3: ("uncertified", STOP)}))
    two = Toy(by_pixel({3: ("certified", STOP)}))
    cascade = Cascade([("one", one), ("two", two)])
    alert, failed, certified = cascade.certify_frames(np.stack([frame(1), frame(2), frame(3)]))
    assert (alert.status, alert.label, alert.stage, alert.reason) == ("alert", -1, "one", "one: patch detected")
    assert (failed.status, failed.certificate) == ("fail-safe", None) and failed.reason.startswith("engine error")
    assert certified.status == "certified" and two.calls[-1] == 1  # only the unsettled frame reached stage two


def test_an_engine_error_in_a_stage_is_fail_safe_for_its_frames_only():
    def broken(f: np.ndarray) -> Outcome:
        if f.flat[0] == 2:
            raise EngineRunError("model engine failed: boom")
        return "uncertified", STOP
    cascade = Cascade([("one", Toy(by_pixel({1: ("certified", STOP)}))), ("two", Toy(broken))])
    done, failed = cascade.certify_frames(np.stack([frame(1), frame(2)]))
    assert done.status == "certified"
    assert failed.status == "fail-safe" and failed.reason == "engine error: model engine failed: boom (stage two)"


def test_agreement_without_certificate_is_uncertified_or_fail_safe():
    stages = [("one", Toy(by_pixel({1: ("uncertified", YIELD)}))), ("two", Toy(by_pixel({1: ("uncertified", YIELD)})))]
    (v,) = Cascade(stages).certify_frames(frame(1)[None])
    assert (v.status, v.label, v.class_name, v.stage) == ("uncertified", YIELD, "yield", "two")
    assert v.certificate.kind == "detection" and not v.certificate.certified
    (v,) = Cascade(stages, on_uncertified="fail-safe").certify_frames(frame(1)[None])
    assert v.status == "fail-safe" and v.reason == "uncertified: no stage certified 'yield'"
    with pytest.raises(ValueError, match="on_uncertified"):
        Cascade(stages, on_uncertified="maybe")


def test_verdict_fields_and_labels_mapped_by_class_name():
    """A later stage with an extra class: its labels map by name, the extra class is appended."""
    sign_first = ["no sign", "speed", "stop", "yield"]
    one = Toy(by_pixel({1: ("uncertified", YIELD), 2: ("uncertified", STOP)}), ms=2)
    two = Toy(by_pixel({1: ("certified", 3), 2: ("certified", 0)}), classes=sign_first, ms=3)
    cascade = Cascade([("default", one), ("doublemask-gtsrb", two)])
    assert cascade.classes == CLASSES + ["no sign"] and cascade.kind == "detection" and cascade.name == "cascade"
    agree, disagree = cascade.certify_frames(np.stack([frame(1), frame(2)]))
    assert (agree.status, agree.label, agree.class_name, agree.stage) == ("certified", YIELD, "yield",
                                                                         "doublemask-gtsrb")
    assert agree.certificate.kind == "detection" and agree.certificate.certified and agree.backend == "toy"
    assert agree.stages == [
        {"stage": "default", "label": YIELD, "class_name": "yield", "status": "uncertified",
         "timings_ms": {"prepare": 0.0, "engine": 2.0, "certify": 0.0, "total": 2.0}},
        {"stage": "doublemask-gtsrb", "label": YIELD, "class_name": "yield", "status": "certified",
         "timings_ms": {"prepare": 0.0, "engine": 3.0, "certify": 0.0, "total": 3.0}}]
    assert agree.timings_ms["engine"] == 5.0 and agree.timings_ms["total"] == pytest.approx(5.0, abs=1.0)
    assert disagree.status == "alert" and disagree.stages[1]["label"] == 3 and "'no sign'" in disagree.reason
    assert agree.to_dict()["stage"] == "doublemask-gtsrb"


def test_with_options_rebinds_every_stage_and_shares_estimates():
    one, two = Toy(by_pixel({})), Toy(by_pixel({}))
    two.min_roi = 12
    cascade = Cascade([("one", one), ("two", two)], threat="2x2")
    assert [str(s.threat) for _, s in cascade.stages] == ["2x2", "2x2"] and str(cascade.threat) == "2x2"
    assert cascade.min_roi == 12 and cascade.input_hw == HW
    twin = cascade.with_options(threat="1x1")
    assert [str(s.threat) for _, s in twin.stages] == ["1x1", "1x1"]
    assert [str(s.threat) for _, s in cascade.stages] == ["2x2", "2x2"]
    twin.certify_frames(frame(1)[None])
    assert twin.latency_ms == cascade.latency_ms
    with pytest.raises(TypeError):
        cascade.with_options(early_exit=False)


def test_one_stage_keeps_its_kind():
    assert Cascade([("one", Toy(by_pixel({}), kind="recovery"))]).kind == "recovery"


def test_load_a_list_of_bundles():
    bundles = [GOLDEN / "bundles" / "masking-bn", GOLDEN / "bundles" / "masking-ds"]
    cascade = certinfer.load(bundles, backend="onnxruntime-cpu")
    assert isinstance(cascade, Cascade) and [n for n, _ in cascade.stages] == [str(b) for b in bundles]
    assert str(cascade.threat) == "2x2,4x4"  # the first stage's
    with np.load(GOLDEN / "frames.npz", allow_pickle=False) as f:
        frames = f["16x16"]
    verdicts = cascade(frames)
    assert len(verdicts) == len(frames) and all(v.stage and v.stages for v in verdicts)
    boxed = cascade(frames[:1], rois=[[(0, 0, 16, 16), (0, 0, 4, 4)]])
    assert [v.status for v in boxed][1] == "fail-safe" and boxed[0].label == verdicts[0].label
    assert isinstance(certinfer.load(bundles[:1], backend="onnxruntime-cpu"), Certifier)
    assert isinstance(certinfer.load(bundles[0], backend="onnxruntime-cpu", on_uncertified="fail-safe"), Cascade)
    with pytest.raises(ValueError, match="expect_sha256"):
        certinfer.load(bundles, expect_sha256="0" * 64)
    with pytest.raises(ValueError, match="randomized"):
        certinfer.load([bundles[0], GOLDEN / "bundles" / "cropping-sample"], backend="onnxruntime-cpu")
