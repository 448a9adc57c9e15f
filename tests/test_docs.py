"""The runnable examples in the docs run as written, on what the package ships."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_block(page: str, section: str) -> str:
    text = (DOCS / page).read_text()
    match = re.search(rf"## {re.escape(section)}.*?```python\n(.*?)```", text, re.S)
    assert match, f"{page}: no python block under '## {section}'"
    return match.group(1)


def test_integration_example_answers_every_box(capsys: pytest.CaptureFixture):
    exec(compile(_python_block("integration.md", "From a detector's boxes"), "integration.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    boxes = [line for line in lines if " box " in line]
    assert len(boxes) == 11 and lines[-1].endswith("frames/s")
    assert sum("fail-safe" in line and "smaller than 8x8" in line for line in boxes) == 1
    assert all(re.search(r"\[(OK|WARN|ERROR|STALE) *\]", line) for line in boxes)
