"""Opening something OpenCV cannot read is one SourceError, with nothing of OpenCV's or FFmpeg's own on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("name, data", [("bad.mp4", b"not a video at all"), ("bad.avi", b"RIFF nonsense")])
def test_a_file_that_is_no_video_leaves_stderr_quiet(tmp_path: Path, name: str, data: bytes):
    pytest.importorskip("cv2", reason="OpenCV is not installed: no video sources to open")
    (tmp_path / name).write_bytes(data)
    # a fresh process: FFmpeg reads its log level once, when OpenCV first uses it
    code = ("import sys\nfrom certinfer.runtime.stream import SourceError, open_source\n"
            f"try:\n    open_source({str(tmp_path / name)!r})\nexcept SourceError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.stdout.startswith("cannot open") and result.stderr == ""


def test_a_camera_that_is_not_there_leaves_stderr_quiet(tmp_path: Path):
    pytest.importorskip("cv2", reason="OpenCV is not installed: no cameras to open")
    code = ("from certinfer.runtime.stream import SourceError, open_source\n"
            "try:\n    open_source(97)\nexcept SourceError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.stdout == "cannot open camera 97 with OpenCV\n" and result.stderr == ""
