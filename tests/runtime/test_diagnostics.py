"""Verdict statuses as ROS 2 DiagnosticStatus levels."""

from __future__ import annotations

import pytest

from certinfer.runtime.diagnostics import ERROR, NAMES, OK, STALE, WARN, level
from certinfer.runtime.verdict import Verdict


@pytest.mark.parametrize("status, reason, expected", [
    ("certified", "", OK), ("uncertified", "", WARN), ("uncertified", "backend not verified", WARN),
    ("alert", "stages disagree", ERROR),
    ("fail-safe", "deadline missed: 30.1 ms > 20 ms", STALE), ("fail-safe", "source broke: camera0", STALE),
    ("fail-safe", "invalid frame: NaN", ERROR), ("fail-safe", "engine error: boom", ERROR),
    ("fail-safe", "invalid box: (0, 0, 4, 4) is smaller than 8x8 pixels", ERROR),
])
def test_levels(status: str, reason: str, expected: int):
    assert level(Verdict(label=0, class_name="", status=status, reason=reason)) == expected
    assert NAMES[expected] in ("OK", "WARN", "ERROR", "STALE") and (OK, WARN, ERROR, STALE) == (0, 1, 2, 3)
