"""True labels where they are known: verdicts carry ``truth`` and ``correct``, the summary counts them."""

from __future__ import annotations

import json

from certinfer.runtime.stream import StreamSummary
from certinfer.runtime.verdict import Verdict


def verdict(frame: str, label: int, status: str = "uncertified", roi: list[int] | None = None) -> Verdict:
    return Verdict(label=label, class_name=str(label), status=status, frame=frame, roi=roi)


def test_truth_and_correct_are_left_out_of_json_when_unknown():
    d = json.loads(verdict("a.png", 3).to_json())
    assert "truth" not in d and "correct" not in d


def test_summary_judges_known_frames_and_counts_correct_and_certified_correct():
    summary = StreamSummary(truth={"a.png": 3, "b.png": 1, "c.png": 2, "d.png": 5})
    a, b, c = verdict("a.png", 3, "certified"), verdict("b.png", 1), verdict("c.png", 4, "certified")
    d, other = Verdict.fail_safe("engine error: x", frame="d.png"), verdict("user.png", 0)
    box = verdict("a.png", 0, roi=[0, 0, 4, 4])  # a box's crop is not the frame the truth is about
    for v in (a, b, c, d, other, box):
        summary.add(v)
    assert [(v.truth, v.correct) for v in (a, b, c, d, other, box)] == [
        (3, True), (1, True), (2, False), (5, False), (None, None), (None, None)]
    assert json.loads(a.to_json())["truth"] == 3 and json.loads(c.to_json())["correct"] is False
    assert str(summary).endswith("; 2 of 4 correct, 1 certified and correct")


def test_summary_without_truth_says_nothing_of_correctness():
    summary = StreamSummary()
    summary.add(verdict("a.png", 3))
    assert str(summary) == "0 frames in, 1 verdicts out: 1 uncertified"
