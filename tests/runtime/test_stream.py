"""Frame sources and the streaming fail-safe policy, on real files, real videos and a real ONNX engine."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certinfer.runtime.stream import (SourceError, StreamSummary, UnreadableFrame, _capture_items, arrays,
                                      decode_image, open_source, run_stream)

RNG = np.random.default_rng(0)


def rgb(h: int = 20, w: int = 24) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def jpeg_bytes(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_mixed_folder(root: Path, png_with_size) -> dict[str, bool]:
    """Real image files, bad ones in the middle; name -> whether it should be answered."""
    root.mkdir()
    Image.fromarray(rgb()).save(root / "00_rgb.png")
    (root / "01_photo.jpg").write_bytes(jpeg_bytes(rgb(30, 40)))
    (root / "02_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
    Image.fromarray(rgb()[..., 0], mode="L").save(root / "03_gray.png")
    (root / "04_truncated.jpg").write_bytes(jpeg_bytes(rgb(64, 64))[:600])
    Image.fromarray(np.dstack([rgb(), np.full((20, 24), 128, np.uint8)]), mode="RGBA").save(root / "05_rgba.png")
    (root / "06_empty.png").write_bytes(b"")
    Image.fromarray(RNG.integers(0, 65536, (20, 24), dtype=np.uint16)).save(root / "07_gray16.png")
    Image.fromarray(rgb()).convert("P").save(root / "08_palette.png")
    (root / "09_bomb.png").write_bytes(png_with_size(20000, 20000))
    (root / "10_last.png").write_bytes((root / "00_rgb.png").read_bytes())
    (root / "notes.txt").write_text("not a frame")
    good = {"00_rgb.png", "01_photo.jpg", "03_gray.png", "05_rgba.png", "07_gray16.png", "08_palette.png",
            "10_last.png"}
    return {p.name: p.name in good for p in sorted(root.iterdir()) if p.suffix != ".txt"}


@pytest.mark.parametrize("batch", [1, 4])
def test_folder_with_bad_files_in_the_middle(certifier, tmp_path: Path, batch: int, png_with_size):
    expected = write_mixed_folder(tmp_path / "frames", png_with_size)
    summary = StreamSummary()
    verdicts = list(run_stream(certifier, tmp_path / "frames", batch=batch, summary=summary))
    assert [v.frame for v in verdicts] == list(expected)  # name order, one verdict per frame
    for v in verdicts:
        if expected[v.frame]:
            assert v.status == "uncertified" and v.class_name and v.backend == "onnxruntime-cpu", v
        else:
            assert v.status == "fail-safe" and v.reason.startswith("unreadable frame: "), v
    assert "truncated" in next(v.reason for v in verdicts if v.frame == "04_truncated.jpg").lower()
    assert summary.frames_in == summary.verdicts_out == len(expected)
    assert summary.reasons == {"unreadable frame": 4}
    assert str(summary) == "11 frames in, 11 verdicts out: 7 uncertified, 4 fail-safe (unreadable frame: 4)"


def test_decoding_converts_modes_deliberately(tmp_path: Path):
    gray16 = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert decode_image(tmp_path / "g16.png")[0].tolist() == [[0] * 3, [100] * 3, [255] * 3]
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0]]], np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert decode_image(tmp_path / "a.png")[0].tolist() == [[200, 100, 50], [0, 0, 0]]  # over black
    Image.fromarray(np.array([[7, 9]], np.uint8), mode="L").save(tmp_path / "l.png")
    out = decode_image(tmp_path / "l.png")
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3) and out[0, 1].tolist() == [9, 9, 9]


def test_oversized_images_are_refused_before_decoding(tmp_path: Path, png_with_size):
    (tmp_path / "wide.png").write_bytes(png_with_size(17000, 10))
    with pytest.raises(UnreadableFrame, match="larger than 16384"):
        decode_image(tmp_path / "wide.png")
    (tmp_path / "bomb.png").write_bytes(png_with_size(20000, 20000))
    with pytest.raises(UnreadableFrame):
        decode_image(tmp_path / "bomb.png")


def test_raw_arrays_invalid_ones_fail_safe(certifier):
    nan = rgb().astype(np.float32)
    nan[3, 4, 1] = np.nan
    frames = [rgb(), nan, rgb().astype(np.float32), rgb()[..., 0], rgb()[..., :2], rgb().astype(np.int16),
              np.zeros((0, 5, 3), np.uint8), "not an array", rgb(40, 30)]
    verdicts = list(run_stream(certifier, frames, batch=3))
    assert [v.frame for v in verdicts] == [str(i) for i in range(len(frames))]
    assert [v.status for v in verdicts] == ["uncertified"] + ["fail-safe"] * 7 + ["uncertified"]
    reasons = [v.reason for v in verdicts[1:8]]
    assert all(r.startswith("invalid frame: ") for r in reasons)
    assert "NaN" in reasons[0] and "float32" in reasons[1] and "int16" in reasons[4]


def test_batch_array_and_single_frame_sources():
    assert [i for i, _ in arrays(np.zeros((3, 4, 4, 3), np.uint8))] == ["0", "1", "2"]
    assert len(list(arrays(np.zeros((4, 4, 3), np.uint8)))) == 1


class FlakyEngine:
    """Wraps a real engine: raises on chosen calls, or mangles the output shape."""

    def __init__(self, inner, fail_calls=(), mangle=None):
        self.inner, self.fail_calls, self.mangle = inner, set(fail_calls), mangle
        self.name, self.max_batch, self.calls = inner.name, inner.max_batch, 0

    def run(self, batch: np.ndarray):
        self.calls += 1
        if self.calls in self.fail_calls:
            raise RuntimeError("CUDA error: device lost")
        out = self.inner.run(batch)
        return self.mangle(out) if self.mangle else out


def test_engine_exception_fails_only_its_frames(certifier):
    certifier.engines["model"] = FlakyEngine(certifier.engine, fail_calls={2})
    summary = StreamSummary()
    verdicts = list(run_stream(certifier, [rgb() for _ in range(4)], summary=summary))
    assert [v.status for v in verdicts] == ["uncertified", "fail-safe", "uncertified", "uncertified"]
    assert verdicts[1].reason == "engine error: model engine failed: RuntimeError: CUDA error: device lost"
    assert summary.reasons == {"engine error": 1}


@pytest.mark.parametrize("mangle, match", [
    (lambda out: out[:, :2], r"shape \(1, 2\)"),
    (lambda out: np.concatenate([out, out]), "expected a batch of 1"),
    (lambda out: np.full_like(out, np.nan), "NaN"),
])
def test_engine_output_of_the_wrong_shape_fails_safe(certifier, mangle, match):
    certifier.engines["model"] = FlakyEngine(certifier.engine, mangle=mangle)
    (v,) = run_stream(certifier, [rgb()])
    assert v.status == "fail-safe" and v.reason.startswith("engine error: model engine output 0")
    assert re.search(match, v.reason), v.reason


def test_missed_deadlines_fail_safe(certifier):
    verdicts = list(run_stream(certifier, [rgb() for _ in range(3)], deadline_ms=0.0, batch=2))
    assert all(v.status == "fail-safe" and v.reason.startswith("deadline missed: ") for v in verdicts)
    assert all(v.timings_ms["total"] > 0 for v in verdicts)
    relaxed = list(run_stream(certifier, [rgb() for _ in range(3)], deadline_ms=60_000, batch=2))
    assert [v.status for v in relaxed] == ["uncertified"] * 3


def write_video(path: Path, n: int) -> list[np.ndarray]:
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    assert writer.isOpened()
    frames = [np.full((24, 32, 3), (40 * i, 0, 255 - 40 * i), np.uint8) for i in range(n)]  # RGB
    for f in frames:
        writer.write(np.ascontiguousarray(f[..., ::-1]))
    writer.release()
    return frames


def test_video_file_round_trip(certifier, tmp_path: Path):
    frames = write_video(tmp_path / "clip.avi", 5)
    items = list(open_source(tmp_path / "clip.avi"))
    assert [i for i, _ in items] == [f"clip.avi#{k}" for k in range(5)]
    assert np.abs(items[2][1].astype(int) - frames[2]).max() < 12  # RGB order, up to JPEG loss
    verdicts = list(run_stream(certifier, tmp_path / "clip.avi", batch=2))
    assert [v.status for v in verdicts] == ["uncertified"] * 5


def test_video_broken_mid_stream_ends_fail_safe(certifier, tmp_path: Path):
    write_video(tmp_path / "clip.avi", 10)
    data = (tmp_path / "clip.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[:int(len(data) * 0.8)])
    summary = StreamSummary()
    verdicts = list(run_stream(certifier, tmp_path / "cut.avi", summary=summary))
    assert verdicts[-1].status == "fail-safe" and "of 10 frames" in verdicts[-1].reason
    assert verdicts[-1].reason.startswith("source broke: ")
    assert all(v.status == "uncertified" for v in verdicts[:-1]) and len(verdicts) > 1
    assert summary.frames_in == summary.verdicts_out


class VanishingCamera:
    """Stands in for cv2.VideoCapture of a camera that is unplugged after two frames."""

    def __init__(self):
        self.reads, self.released = 0, False

    def read(self):
        self.reads += 1
        return (True, np.zeros((8, 8, 3), np.uint8)) if self.reads <= 2 else (False, None)

    def release(self):
        self.released = True


def test_camera_that_disappears_ends_with_a_fail_safe_item():
    cam = VanishingCamera()
    items = list(_capture_items(cam, "camera0", None, live=True))
    assert [i for i, _ in items] == ["camera0#0", "camera0#1", "camera0#2"]
    assert isinstance(items[-1][1], SourceError) and "stopped delivering frames" in str(items[-1][1])
    assert cam.released


def test_sources_that_cannot_open_raise(tmp_path: Path):
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image files"):
        open_source(tmp_path / "empty")


def test_unopenable_video_and_missing_opencv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("cv2")
    (tmp_path / "bad.avi").write_bytes(b"RIFF nonsense")
    with pytest.raises(SourceError, match="cannot open"):
        open_source(tmp_path / "bad.avi")
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    with pytest.raises(SourceError, match=r'pip install "\.\[video\]"'):
        open_source(tmp_path / "bad.avi")


def test_single_image_file(certifier, tmp_path: Path):
    Image.fromarray(rgb()).save(tmp_path / "one.png")
    (v,) = run_stream(certifier, str(tmp_path / "one.png"))
    assert v.frame == "one.png" and v.status == "uncertified"
    assert set(v.timings_ms) == {"prepare", "engine", "certify", "total"}
