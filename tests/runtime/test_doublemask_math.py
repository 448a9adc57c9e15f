"""Double masking: the mask set's covering property, masking, certification and inference against the paper."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from certinfer.bench.doublemask_reference import reference_decisions
from certinfer.threat import ThreatError, parse
from certinfer.runtime.defenses import doublemask as dm
from certinfer.runtime.geometry import Geometry

THREATS = ("5x5", "2.4%", "area:24", "rot45:5x5", "3x7")
SIZES = ((32, 32), (16, 24), (7, 9), (9, 7))
STRIDES = (1, 2, 5, (3, 4), 40)


def _covered(masks: np.ndarray, hw, rect) -> bool:
    """Brute force: every location of ``rect`` lies entirely inside at least one mask."""
    h, w = rect
    return all(masks[:, r:r + h, c:c + w].all(axis=(1, 2)).any()
               for r in range(hw[0] - h + 1) for c in range(hw[1] - w + 1))


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("threat", THREATS)
@pytest.mark.parametrize("stride", STRIDES)
def test_mask_set_covers_every_location_of_every_rectangle(hw, threat, stride):
    try:
        rects = parse(threat, input_hw=hw).rects
    except ThreatError:
        pytest.skip(f"{threat} does not fit {hw}")
    masks = dm.mask_set(hw, threat, stride)
    assert masks.dtype == bool and masks.shape[1:] == hw
    assert len({m.tobytes() for m in masks}) == len(masks)  # deduplicated
    for rect in rects:
        assert _covered(masks, hw, rect), rect


def test_mask_sizes_stride_and_flush_border():
    boxes = dm.mask_boxes((32, 32), "5x5", 5)
    assert set(map(tuple, boxes[:, 2:])) == {(9, 9)}
    assert sorted(set(boxes[:, 0])) == [0, 5, 10, 15, 20, 23]  # the last mask flush with the border
    assert len(boxes) == 36  # PatchCleanser's 6 x 6 for a 5x5 patch on 32x32 at stride 5
    big = dm.mask_boxes((7, 9), "5x5", 40)  # masks larger than the input are clipped to it: one mask
    assert big.tolist() == [[0, 0, 7, 9]]
    assert dm.mask_boxes((16, 24), "3x7", (3, 4)).tolist()[:2] == [[0, 0, 5, 10], [0, 4, 5, 10]]


def test_mask_set_rejects_bad_strides():
    for bad in (0, -1, 1.5, (2, 0)):
        with pytest.raises(ValueError):
            dm.mask_set((32, 32), "5x5", bad)


def test_masked_copies_are_bit_exact_for_any_value_and_row_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 3, 7, 9)).astype(np.float32)
    x[0, 1, 2, 3], x[1, 0, 0, 0], x[2, 2, 6, 8] = -0.0, np.nan, np.inf  # bits that arithmetic would not keep
    masks = dm.mask_set((7, 9), "2x2", 3)
    frames = np.array([2, 0, 0, 1, 2, 2, 1, 0])  # runs of equal frames, in any order
    masked = masks[rng.integers(0, len(masks), len(frames))] | masks[rng.integers(0, len(masks), len(frames))]
    for value in (0.0, -0.0, 1.5, [1.0, -2.0, 0.5]):
        out = dm.masked_copies(x, masked, frames, value)
        assert out.shape == (len(frames), 3, 7, 9) and out.dtype == np.float32
        v = np.broadcast_to(np.asarray(value, np.float32).reshape(-1, 1, 1), (3, 7, 9))
        for r, f in enumerate(frames):
            assert np.array_equal(out[r].view(np.uint32), np.where(masked[r], v, x[f]).view(np.uint32))
    with pytest.raises(ValueError, match="do not fit"):
        dm.masked_copies(x, masked[:3], frames)


# --- certification and inference against the plain reference, on stand-in classifiers -------------------------

HW = (16, 16)
CLASSES = ["a", "b", "c", "d"]


class RowEngine:
    """A deterministic stand-in engine: each row's output depends on that row alone (one matrix-vector product
    per row), floored to integers so that ties between classes happen. Counts calls and rows."""

    name = "stand-in"
    precision = "fp32"
    max_batch = 4096

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.rows += len(batch)
        return np.stack([self.fn(row) for row in batch]).astype(np.float32)


def _linear(shape, scale: float, seed: int):
    w = np.random.default_rng(seed).normal(size=(len(CLASSES), int(np.prod(shape))))
    return lambda row: np.floor(w @ row.astype(np.float64).ravel() * scale)


def _front(row: np.ndarray) -> np.ndarray:
    """(3, 16, 16) -> (2, 8, 8): 3x3 window sums at stride 2, padding 1 (exactly local)."""
    p = np.pad(row, ((0, 0), (1, 1), (1, 1)))
    sums = sum(p[:, dr:dr + 16:2, dc:dc + 16:2] for dr in range(3) for dc in range(3))
    return np.stack([sums[:2].sum(0), sums[1:].sum(0)])


FRONT_GEOMETRY = {"rf": [3, 3], "stride": [2, 2], "padding": [1, 1], "input_hw": [16, 16], "output_hw": [8, 8]}


def _certifier(space: str = "pixel", threat: str = "3x3", stride=3, scale: float = 0.05, seed: int = 0,
               mask_value=0.0, verified: bool = True, unit: float = 1.0):
    """A stand-in bundle; ``unit`` scales the integer logits (gaps are multiples of it)."""
    params = {"stride": stride, "mask_value": mask_value, "space": space}
    manifest = {"defense": {"kind": "doublemask", "params": params}, "threat": threat,
                "input": {"hw": list(HW), "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": CLASSES},
                "probe": {"exact_backends": ["stand-in"] if verified else []}}
    if space == "pixel":
        linear = _linear((3, *HW), scale, seed)
        engines = {"model": RowEngine(lambda row: linear(row) * unit)}
    else:
        manifest["geometry"] = FRONT_GEOMETRY
        engines = {"front": RowEngine(_front), "back": RowEngine(_linear((2, 8, 8), scale, seed))}
    return dm.DoubleMaskCertifier(SimpleNamespace(manifest=manifest), engines, parse(threat, input_hw=HW))


def _frames(n: int, seed: int) -> np.ndarray:
    """Random frames, half of them a flat colour plus noise (masked copies of those tend to agree)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(n, *HW, 3))
    flat = rng.integers(0, 256, size=(n, 1, 1, 3)) + rng.integers(-20, 21, size=(n, *HW, 3))
    return np.where(np.arange(n)[:, None, None, None] % 2 == 0, frames, np.clip(flat, 0, 255)).astype(np.uint8)


def _check_against_reference(certifier, frames) -> list[int]:
    features, _ = certifier.timed_features(frames)
    decisions = certifier.certify(features)
    expected = reference_decisions(certifier, frames)
    for d, (label, _, cert) in zip(decisions, expected, strict=True):
        assert d.label == label
        assert d.certificate == cert
        assert d.certificate.kind == "recovery"
    return [case for _, case, _ in expected]


@pytest.mark.parametrize("space", ["pixel", "feature"])
def test_runtime_equals_plain_reference_and_hits_every_case(space):
    certifier = _certifier(space, scale=0.05 if space == "pixel" else 0.4)
    cases = _check_against_reference(certifier, _frames(48, seed=1))
    assert {1, 2, 3} <= set(cases), cases


def test_ties_are_flips():
    certifier = _certifier(scale=0.01)  # coarse integer logits: many ties
    frames = _frames(32, seed=2)
    _check_against_reference(certifier, frames)
    decisions = certifier(frames)
    margins = [v.certificate.per_rect["3x3"].margin for v in decisions]
    assert 0.0 in margins
    assert all(v.certificate.certified == (v.certificate.per_rect["3x3"].margin > 0) for v in decisions)


def test_certified_frames_return_the_certified_label_by_agreement():
    certifier = _certifier()
    frames = _frames(48, seed=3)
    features, _ = certifier.timed_features(frames)
    certified = 0
    for f, d in enumerate(certifier.certify(features)):
        if d.certificate.certified:
            certified += 1
            assert (features.one[f].argmax(-1) == d.label).all() and (features.two[f] == d.label).all()
    assert certified


@pytest.mark.parametrize("space", ["pixel", "feature"])
def test_early_exit_gives_identical_decisions_with_fewer_rows(space):
    certifier = _certifier(space, scale=0.05 if space == "pixel" else 0.4)
    frames = _frames(32, seed=4)
    fast, _ = certifier.timed_features(frames)
    full, _ = certifier.with_options(early_exit=False).timed_features(frames)
    assert certifier.certify(fast) == certifier.certify(full)
    k = len(certifier.masks)
    distinct = k + (dm.twins(certifier.masks, *certifier.pairs) < 0).sum()  # copies not equal to an earlier one
    assert distinct < k * (k + 1) // 2 if space == "feature" else distinct == k * (k + 1) // 2
    assert (full.rows == distinct).all()
    assert (fast.rows <= full.rows).all() and fast.rows.sum() < full.rows.sum()
    agree = (fast.one.argmax(-1) == fast.one.argmax(-1)[:, :1]).all(axis=1)
    certified = np.array([d.certificate.certified for d in certifier.certify(fast)])
    assert (fast.rows[certified] == distinct).all() and (fast.rows[~agree] < distinct).all()


@pytest.mark.parametrize("space", ["pixel", "feature"])
def test_twins_mask_exactly_the_same_positions(space):
    masks = _certifier(space).masks
    i, j = dm.pair_order(masks)
    twin, k = dm.twins(masks, i, j), len(masks)
    seen = [m.tobytes() for m in masks]
    for p in range(len(i)):
        union = masks[i[p]] | masks[j[p]]
        if twin[p] < 0:
            assert union.tobytes() not in seen
        elif twin[p] < k:
            assert np.array_equal(union, masks[twin[p]])
        else:
            q = twin[p] - k
            assert q < p and twin[q] < 0 and np.array_equal(union, masks[i[q]] | masks[j[q]])
        seen.append(union.tobytes())
    assert (twin >= 0).any() == (space == "feature")


def test_pairs_are_checked_nearest_the_centre_first():
    masks = dm.mask_set((32, 32), "5x5", 5)
    i, j = dm.pair_order(masks)
    k = len(masks)
    assert sorted(zip(i.tolist(), j.tolist())) == [(a, b) for a in range(k) for b in range(a + 1, k)]
    centre = [14, 15, 20, 21]  # the four masks nearest the centre of a 6 x 6 grid
    assert set(i[:6].tolist()) | set(j[:6].tolist()) == set(centre)
    corners = {0, 5, 30, 35}
    assert set(i[-6:].tolist()) | set(j[-6:].tolist()) == corners  # pairs of corners come last
    assert (i[-1], j[-1]) == (30, 35)  # equal offsets: row-major order


def test_masked_copies_go_to_the_engine_in_one_call_per_round():
    certifier = _certifier()
    engine = certifier.engines["model"]
    features, _ = certifier.timed_features(_frames(8, seed=5))
    assert engine.calls == 2 and engine.rows == features.rows.sum()


def test_a_frame_whose_pairs_fail_stops_at_the_block_of_its_first_failure(monkeypatch):
    frames = _frames(32, seed=4)
    full = _certifier().with_options(early_exit=False)
    full_features, _ = full.timed_features(frames)
    expected = full.certify(full_features)
    certifier = _certifier()
    certifier.engines["model"].name = "stand-in-cpu"
    monkeypatch.setattr(dm, "CPU_BATCH_BYTES", frames[0].size * 4)  # one normalized frame a call: a pair a block
    k, stopped = len(certifier.masks), 0
    for f, d in enumerate(expected):
        one, _ = certifier.timed_features(frames[f:f + 1])
        assert certifier.certify(one) == [d]
        agree = (one.one[0].argmax(-1) == d.label).all() and dm.gaps(one.one[0], d.label).min() > 0
        if agree and not d.certificate.certified:
            first = np.flatnonzero(full_features.two_gap[f] <= 0)[0]
            assert one.rows[0] == k + first + 1  # nothing checked past the first failing pair
            stopped += 1
    assert stopped


def test_a_cpu_engine_gets_cache_sized_calls_and_the_same_decisions(monkeypatch):
    frames = _frames(8, seed=5)
    reference = _certifier()
    expected = reference.certify(reference.timed_features(frames)[0])
    certifier = _certifier()
    engine = certifier.engines["model"]
    engine.name = "stand-in-cpu"
    monkeypatch.setattr(dm, "CPU_BATCH_BYTES", 6 * frames[0].size * 4)  # 6 normalized frames a call
    features, _ = certifier.timed_features(frames)
    first = len(frames) * len(certifier.masks)
    assert engine.calls == -(-first // 6) + -(-(features.rows.sum() - first) // 6)
    assert engine.rows == features.rows.sum()
    assert certifier.certify(features) == expected


def test_mask_value_is_what_masked_pixels_hold():
    seen = []
    certifier = _certifier(mask_value=[1.5, -2.0, 0.25])
    certifier.engines["model"].fn = lambda row: (seen.append(row.copy()), np.zeros(len(CLASSES)))[1]
    certifier.timed_features(_frames(1, seed=6))
    masks = certifier.masks
    for k, row in enumerate(seen[:len(masks)]):
        assert np.array_equal(row[:, masks[k]], np.broadcast_to([[1.5], [-2.0], [0.25]], (3, masks[k].sum())))


# --- pieces ------------------------------------------------------------------------------------------------------

def test_recover_cases_and_majority_ties():
    one = np.array([2, 2, 2])
    assert dm.recover(one, np.full((3, 3), 2)) == (2, 1)
    one = np.array([1, 1, 0])  # mask 2 disagrees; its row agrees with it: case 2
    two = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    assert dm.recover(one, two) == (0, 2)
    two[2, 0] = two[0, 2] = 1  # its row no longer agrees: case 3, the majority
    assert dm.recover(one, two) == (1, 3)
    assert dm.majority(np.array([0, 3, 3, 0, 1])) == 3  # a tie goes to the largest label
    with pytest.raises(ValueError, match="not run"):
        dm.recover(np.array([1, 1, 0]), np.full((3, 3), -1))


def _sees(g: Geometry, axis: int, cell: int, pixel: int) -> bool:
    """Whether feature cell ``cell`` on ``axis`` has input ``pixel`` in its receptive field."""
    first = cell * g.stride[axis] - g.padding[axis]
    return first <= pixel <= first + g.rf[axis] - 1


def test_feature_masks_match_the_receptive_field_by_brute_force():
    for geo in ({"rf": [3, 3], "stride": [2, 2], "padding": [1, 1], "input_hw": [16, 16], "output_hw": [8, 8]},
                {"rf": [7, 5], "stride": [4, 2], "padding": [0, 2], "input_hw": [16, 24], "output_hw": [3, 12]},
                {"rf": [9, 9], "stride": [1, 1], "padding": [4, 4], "input_hw": [7, 9], "output_hw": [7, 9]}):
        g = Geometry.from_dict(geo)
        hw = g.input_hw
        for threat, stride in (("3x3", 2), ("2x5", (3, 1)), ("area:6", 4)):
            boxes = dm.mask_boxes(hw, threat, stride)
            pixel = dm.box_masks(boxes, hw)
            expected: list[np.ndarray] = []
            for m in pixel:
                cells = np.array([[any(m[r, c] for r in range(hw[0]) for c in range(hw[1])
                                       if _sees(g, 0, i, r) and _sees(g, 1, j, c))
                                   for j in range(g.output_hw[1])] for i in range(g.output_hw[0])])
                if not any(np.array_equal(cells, e) for e in expected):
                    expected.append(cells)
            assert np.array_equal(dm.feature_masks(boxes, g), np.stack(expected))


def test_roles_and_exactness_follow_the_space():
    """Feature space relies on the front part's locality bit for bit (a verified backend); pixel space needs only
    fp32 (elsewhere its margins must clear the tolerance)."""
    pixel, feature = _certifier("pixel"), _certifier("feature")
    assert pixel.roles == ("model",) and not pixel.needs_exact and not pixel.local_outputs
    assert feature.roles == ("front", "back") and feature.needs_exact and feature.local_outputs
    pixel.engines["model"].precision = "fp16"
    assert pixel.needs_exact
    assert dm.DoubleMaskCertifier.roles_for(feature.manifest) == ("front", "back")
    x = feature.prepare(_frames(2, seed=7))
    assert np.array_equal(feature.local_features(x), np.stack([_front(r) for r in x]).transpose(0, 2, 3, 1))
    with pytest.raises(NotImplementedError):
        pixel.local_features(x)


def test_bad_bundle_params_and_options_are_refused():
    with pytest.raises(ValueError, match="space"):
        _certifier("voxel")
    with pytest.raises(ValueError, match="mask_value"):
        _certifier(mask_value=float("nan"))
    with pytest.raises(ValueError, match="early_exit"):
        dm.DoubleMaskOptions(early_exit="yes")


def test_gaps_per_row_labels_and_ties():
    logits = np.array([[3.0, 1.0, 3.0], [0.0, 2.0, -1.0]], dtype=np.float32)
    assert dm.gaps(logits, 0).tolist() == [0.0, -2.0]  # a tie is no win
    assert dm.gaps(logits, np.array([1, 1])).tolist() == [-2.0, 2.0]


def test_an_unverified_backend_needs_margins_above_the_tolerance_as_the_reference_does():
    """Logits in steps of 1/2048 (under the 1e-3 tolerance): gaps of one or two steps certify on a verified
    backend, not on an unverified one, and both runtimes equal the plain reference."""
    verified, unverified = (_certifier(scale=0.05, unit=1 / 2048, verified=v) for v in (True, False))
    assert (verified.required_margin, unverified.required_margin) == (0.0, unverified.tolerance) == (0.0, 1e-3)
    assert (verified.batch_atol(), unverified.batch_atol()) == (0.0, 5e-4)
    frames = _frames(48, seed=11)
    for certifier in (verified, unverified):
        _check_against_reference(certifier, frames)
    strict, tolerant = (c.certify(c.timed_features(frames)[0]) for c in (verified, unverified))
    thin = [a.certificate.per_rect["3x3"].margin for a in strict
            if a.certificate.certified and a.certificate.per_rect["3x3"].margin <= 1e-3]
    assert thin  # the frames the tolerance decides
    assert sum(d.certificate.certified for d in tolerant) == sum(d.certificate.certified for d in strict) - len(thin)


class _BatchDependentEngine:
    """Two classes on a backend that rounds differently by batch: the rival scores the copy's brightest channel-0
    value, the label a constant that moves by ``EPS`` (the batch moves a logit by 2 ``EPS``, under half the
    tolerance) with the number of frames in the call (``k`` rows each in the first round)."""

    name, precision, max_batch = "batch-dependent", "fp32", 1 << 20
    EPS = 2e-4

    def __init__(self, k: int):
        self.k = k

    def run(self, batch: np.ndarray) -> np.ndarray:
        logits = np.empty((len(batch), 2), np.float32)
        logits[:, 0] = batch[:, 0].max(axis=(1, 2))
        logits[:, 1] = 0.5 + (self.EPS if (len(batch) // self.k) % 2 else -self.EPS)
        return logits


def _batch_dependent_certifier(verified: bool) -> dm.DoubleMaskCertifier:
    manifest = {"defense": {"kind": "doublemask", "params": {"stride": 1}}, "threat": "1x1",
                "input": {"hw": [6, 6], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                          "classes": ["rival", "label"]},
                "probe": {"exact_backends": ["batch-dependent"] if verified else []}}
    return dm.DoubleMaskCertifier(SimpleNamespace(manifest=manifest), {"model": _BatchDependentEngine(36)},
                                  parse("1x1", input_hw=(6, 6)))


def test_double_masking_stays_sound_on_a_batch_dependent_backend():
    """The attack: certify each frame alone, then patch one pixel (to the brightest value) at every location and
    run inference on the patched frame beside the clean one, a batch the backend rounds the other way. Frames
    certified above the tolerance never flip; a strict margin alone (the backend taken as verified) certifies
    frames with a pixel a hair under the label's score, which the other batch flips, so the test can tell."""
    cert, strict = _batch_dependent_certifier(verified=False), _batch_dependent_certifier(verified=True)
    assert not cert.trusted and not cert.needs_exact and cert.batch_atol() > 2 * _BatchDependentEngine.EPS
    rng = np.random.default_rng(0)
    frames = rng.uniform(0.0, 0.4, size=(12, 3, 6, 6)).astype(np.float32)
    frames[::2, 0, 2, 3] = 0.5 + 1e-4  # a near tie in every other frame
    certified = unsafe = 0
    for x in frames:
        verdict = cert.certify(cert.infer(x[None]))[0]
        flipped = False
        for i in range(6):
            for j in range(6):
                patched = x.copy()
                patched[0, i, j] = 1.0
                flipped |= cert.certify(cert.infer(np.stack([patched, x])))[0].label != verdict.label
        assert not (verdict.certificate.certified and flipped)
        certified += verdict.certificate.certified
        unsafe += strict.certify(strict.infer(x[None]))[0].certificate.certified and flipped
    assert certified == 6 and unsafe == 6
