"""A detector's boxes as JSON lines, and the stream that certifies them: one verdict per box."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from certinfer.runtime.certifier import Certifier
from certinfer.runtime.detections import Detection, DetectionsError, detection, read
from certinfer.runtime.stream import run_stream


def det(cx: float, cy: float, sx: float, sy: float, id: str = "", theta: float = 0.0, **extra) -> dict:
    return {"id": id, "bbox": {"center": {"position": {"x": cx, "y": cy}, "theta": theta}, "size_x": sx,
                               "size_y": sy}, **extra}


def test_detection2d_fields_become_a_box():
    d = detection(det(50, 40, 20, 10, "7", results=[{"hypothesis": {"class_id": "sign", "score": 0.4}},
                                                     {"hypothesis": {"class_id": "light", "score": 0.9}}]))
    assert d == Detection((40.0, 35.0, 60.0, 45.0), "7", "light", 0.9)


@pytest.mark.parametrize("line, message", [
    ('{"detections": []}', 'needs "frame"'),
    ('{"frame": true, "detections": []}', "frame name or a 0-based position"),
    ('{"frame": "a.png", "detections": {}}', "must be a list"),
    ('{"frame": "a.png", "detections": [{"id": 1}]}', "needs a bbox"),
    (json.dumps({"frame": 0, "detections": [det(1, 1, 2, 2, theta=0.3)]}), "rotated"),
    (json.dumps({"frame": 0, "detections": [det("a", 1, 2, 2)]}), "position.x must be a number"),
    ("{not json", "line 2"),
])
def test_bad_files_name_the_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "d.jsonl"
    path.write_text('{"frame": 0, "detections": []}\n' + line + "\n")
    with pytest.raises(DetectionsError, match=message) as e:
        read(path)
    assert "line 2" in str(e.value)


def test_stream_answers_each_box_by_frame_name_or_position(certifier: Certifier, tmp_path: Path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in range(3)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"frame": "0", "detections": [det(20, 20, 30, 30, "a"), det(60, 40, 20, 20, "b")]},
        {"frame": 2, "detections": [det(40, 30, 80, 60, "c"), det(2, 2, 2, 2, "tiny")]},
    ]))
    verdicts = list(run_stream(certifier, frames, batch=2, rois=read(path)))
    assert [(v.frame, v.roi_id) for v in verdicts] == [("0", "a"), ("0", "b"), ("2", "c"), ("2", "tiny")]
    assert [v.roi for v in verdicts[:3]] == [[5, 5, 35, 35], [50, 30, 70, 50], [0, 0, 80, 60]]
    assert verdicts[3].status == "fail-safe" and "smaller than" in verdicts[3].reason
    whole = certifier.certify_frames(frames[2][None])[0]
    assert verdicts[2].label == whole.label and verdicts[2].scores == whole.scores


def test_stream_bad_frame_with_boxes_is_one_fail_safe(certifier: Certifier):
    good = np.zeros((40, 40, 3), np.uint8)
    rois = {0: [Detection((0, 0, 20, 20))], 1: [Detection((0, 0, 20, 20)), Detection((5, 5, 30, 30))]}
    verdicts = list(run_stream(certifier, [good, np.zeros((40, 40), np.float32)], rois=rois))
    assert [v.status == "fail-safe" for v in verdicts] == [False, True]
    assert verdicts[1].reason.startswith("invalid frame")


def test_frames_of_different_sizes_in_one_batch(certifier: Certifier):
    frames = [np.zeros((40, 40, 3), np.uint8), np.full((50, 70, 3), 200, np.uint8)]
    rois = {0: [Detection((0, 0, 40, 40))], 1: [Detection((0, 0, 70, 50))]}
    verdicts = list(run_stream(certifier, frames, batch=2, rois=rois))
    assert [v.frame for v in verdicts] == ["0", "1"]
    assert [v.label for v in verdicts] == [certifier.certify_frames(f[None])[0].label
                                           for f in (frames[0], frames[1])]
