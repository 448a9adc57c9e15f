"""Regions of interest: boxes cut from camera frames, checked, certified in one batch, placed in their verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from certinfer.runtime import regions
from certinfer.runtime.certifier import Certifier
from certinfer.runtime.regions import RoiError, check_box, per_frame


def _frame(h: int = 90, w: int = 120, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _direct(frame: np.ndarray, box, hw) -> np.ndarray:
    """The reference cut: plain slicing and Pillow's bilinear resize."""
    x0, y0, x1, y1 = box
    return np.asarray(Image.fromarray(frame[y0:y1, x0:x1]).resize((hw[1], hw[0]), Image.BILINEAR))


def test_each_box_is_certified_as_its_direct_crop(certifier: Certifier):
    frame = _frame()
    boxes = [(0, 0, 40, 30), (10.2, 20.7, 64.5, 80), (100, 50, 120, 90), (5, 5, 21, 21)]
    got = certifier(frame, rois=boxes)
    pixels = [(0, 0, 40, 30), (10, 20, 65, 80), (100, 50, 120, 90), (5, 5, 21, 21)]  # rounded outwards
    want = certifier.certify_frames(np.stack([_direct(frame, b, certifier.input_hw) for b in pixels]))
    assert [v.roi for v in got] == [list(b) for b in pixels]
    assert [v.frame for v in got] == ["0"] * 4
    assert [v.label for v in got] == [v.label for v in want]
    assert [v.scores for v in got] == [v.scores for v in want]
    assert [v.certificate for v in got] == [v.certificate for v in want]


def test_all_boxes_of_all_frames_go_in_one_engine_call(certifier: Certifier, monkeypatch: pytest.MonkeyPatch):
    calls = []
    original = type(certifier).certify_frames
    monkeypatch.setattr(type(certifier), "certify_frames", lambda self, f: calls.append(len(f)) or original(self, f))
    frames = np.stack([_frame(seed=1), _frame(seed=2)])
    verdicts = certifier(frames, rois=[[(0, 0, 30, 30), (30, 30, 60, 60)], [(1, 1, 40, 40)]])
    assert calls == [3]
    assert [(v.frame, v.roi) for v in verdicts] == [("0", [0, 0, 30, 30]), ("0", [30, 30, 60, 60]),
                                                    ("1", [1, 1, 40, 40])]


@pytest.mark.parametrize("box, reason", [
    ((0, 0, 4, 40), "smaller than 8x8"),  # too narrow
    ((10, 10, 10, 40), "smaller than 8x8"),  # empty
    ((30, 40, 10, 60), "smaller than 8x8"),  # reversed
    ((-1, 0, 20, 20), "not inside the 120x90 frame"),
    ((0, 0, 121, 20), "not inside"),
    ((0, 80, 20, 90.5), "not inside"),
    ((math.nan, 0, 20, 20), "finite"),
    ((0, 0, math.inf, 20), "finite"),
])
def test_bad_boxes_are_fail_safe_and_lose_nothing_else(certifier: Certifier, box, reason):
    frame = _frame()
    good = (0, 0, 120, 90)  # the whole frame, flush with both borders
    verdicts = certifier(frame, rois=[good, box, good])
    assert [v.status for v in verdicts][1] == "fail-safe"
    assert reason in verdicts[1].reason and verdicts[1].reason.startswith("invalid box")
    assert verdicts[0].status != "fail-safe" and verdicts[2].status != "fail-safe"
    assert verdicts[0].label == verdicts[2].label == certifier.certify_frames(frame[None])[0].label


def test_minimum_box_comes_from_the_bundle(certifier: Certifier):
    assert certifier.min_roi == regions.MIN_ROI == 8
    certifier.manifest["input"]["min_roi"] = 20
    v = certifier(_frame(), rois=[(0, 0, 19, 40), (0, 0, 20, 20)])
    assert v[0].status == "fail-safe" and "20x20" in v[0].reason and v[1].status != "fail-safe"


def test_check_box_rounds_outwards():
    assert check_box((0.9, 1.1, 9.1, 9.9), (20, 20), 8) == (0, 1, 10, 10)
    assert check_box((0, 0, 20, 20), (20, 20), 8) == (0, 0, 20, 20)


def test_roi_layouts():
    one = per_frame([(0, 0, 10, 10), (1, 1, 9, 9)], 1)
    assert len(one) == 1 and one[0].shape == (2, 4)
    two = per_frame([[(0, 0, 10, 10)], []], 2)
    assert [b.shape for b in two] == [(1, 4), (0, 4)]
    assert per_frame(np.zeros((2, 3, 4)), 2)[1].shape == (3, 4)
    with pytest.raises(RoiError, match="one list of"):
        per_frame([[(0, 0, 10, 10)]], 3)
    with pytest.raises(RoiError, match="frame 1"):
        per_frame([[(0, 0, 10, 10)], [(1, 2, 3)]], 2)


def test_a_frame_without_boxes_gets_no_verdicts(certifier: Certifier):
    frames = np.stack([_frame(seed=3), _frame(seed=4)])
    verdicts = certifier(frames, rois=[[], [(0, 0, 50, 50)]])
    assert [v.frame for v in verdicts] == ["1"]
    assert certifier(frames[0], rois=[]) == []
