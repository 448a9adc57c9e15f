"""Bad input through the public API (``certifier(frames)``, ``run_stream``) and the CLI: a clear error naming the
problem, or a fail-safe verdict in streaming mode; good frames afterwards are still answered the same.

(test_stream.py covers corrupt, truncated, gray, RGBA, 16-bit, palette and bomb files in a folder stream, broken
videos, vanished cameras, engine faults and deadlines; test_bundle.py tampered and unsafe bundles.)
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certinfer.cli import main
from certinfer.runtime.certifier import Certifier
from certinfer.runtime.frames import MAX_PIXELS, FrameError
from certinfer.runtime.stream import StreamSummary, run_stream

RNG = np.random.default_rng(7)


def good(n: int = 2, h: int = 20, w: int = 24) -> np.ndarray:
    return RNG.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def huge(h: int, w: int, dtype=np.uint8, fill=0) -> np.ndarray:
    """An (h, w, 3) frame that takes no memory (every pixel is one broadcast value)."""
    return np.broadcast_to(np.array(fill, dtype), (h, w, 3))


def _key(v) -> tuple:
    return v.label, v.status, v.certificate, v.scores


BAD_FRAMES = [
    pytest.param(huge(20000, 20000), "20000x20000 is larger than 16384 pixels on a side", id="20000x20000"),
    pytest.param(np.broadcast_to(np.uint8(0), (2, 20000, 640, 3)), "larger than 16384", id="tall-batch"),
    pytest.param(huge(9000, 9000), f"9000x9000 has more than {MAX_PIXELS} pixels", id="81M-pixels"),
    pytest.param(huge(20000, 20000, np.float32, np.nan), "larger than 16384", id="huge-nan-refused-by-size"),
    pytest.param(np.zeros((0, 0, 3), np.uint8), "empty", id="0x0"),
    pytest.param(np.zeros((16, 0, 3), np.uint8), "empty", id="16x0"),
    pytest.param(np.zeros((0, 16, 16, 3), np.uint8), "empty frame batch", id="empty-batch"),
    pytest.param(np.zeros((16, 16), np.uint8), "got shape (16, 16) (a grayscale frame", id="gray-2d"),
    pytest.param(np.zeros((16, 16, 1), np.uint8), "got 1 (grayscale", id="gray-1ch"),
    pytest.param(np.zeros((16, 16, 2), np.uint8), "got 2 (grayscale with alpha", id="gray-alpha"),
    pytest.param(np.zeros((3, 16, 16, 4), np.uint8), "got 4 (RGBA", id="rgba"),
    pytest.param(np.zeros((16, 16, 3), np.uint16), "got dtype uint16 (16-bit? scale to 8 bits)", id="16-bit"),
    pytest.param(np.zeros((16, 16, 3), np.int32), "got dtype int32 (32-bit", id="int32"),
    pytest.param(np.zeros((16, 16, 3), np.float32), "got dtype float32 (floats?", id="float32"),
    pytest.param(np.full((16, 16, 3), np.inf, np.float64), "NaN or inf", id="inf"),
    pytest.param(np.full((2, 16, 16, 3), -np.inf, np.float16), "NaN or inf", id="-inf-f16"),
    pytest.param(np.where(np.eye(16, dtype=bool)[..., None], np.nan, 0.5).repeat(3, 2), "NaN or inf", id="nan-diag"),
    pytest.param(np.zeros((16, 16, 3), bool), "got dtype bool", id="bool"),
    pytest.param(np.array(3, np.uint8), "got shape ()", id="rank-0"),
    pytest.param(np.zeros(48, np.uint8), "got shape (48,)", id="rank-1"),
    pytest.param(np.zeros((1, 2, 16, 16, 3), np.uint8), "got shape (1, 2, 16, 16, 3)", id="rank-5"),
    pytest.param([[[0, 0, 0]]], "must be a numpy array, got list", id="list"),
    pytest.param(None, "must be a numpy array, got NoneType", id="none"),
    pytest.param(Image.new("RGB", (4, 4)), "must be a numpy array, got Image", id="pil-image"),
]


@pytest.mark.parametrize("frames, message", BAD_FRAMES)
def test_bad_frames_raise_a_frame_error_naming_the_problem(certifier: Certifier, frames, message: str):
    ok = good()
    before = [_key(v) for v in certifier(ok)]
    t0 = time.perf_counter()
    with pytest.raises(FrameError) as error:
        certifier(frames)
    assert message in str(error.value)
    assert time.perf_counter() - t0 < 0.5  # refused from the shape: no pass over 400M pixels
    assert [_key(v) for v in certifier(ok)] == before  # the certifier is unharmed


def test_views_and_odd_layouts_are_accepted_as_their_copies(certifier: Certifier):
    frames = good(3, 40, 30)
    expected = [_key(v) for v in certifier(np.ascontiguousarray(frames[:, ::2, ::-1, ::-1]))]
    assert [_key(v) for v in certifier(frames[:, ::2, ::-1, ::-1])] == expected  # strided, BGR->RGB view
    fortran = np.asfortranarray(frames[0])
    assert [_key(v) for v in certifier(fortran)] == [_key(v) for v in certifier(frames[0].copy())]
    readonly = frames.copy()
    readonly.setflags(write=False)
    assert len(certifier(readonly)) == 3


def test_stream_turns_each_bad_array_into_one_fail_safe_verdict(certifier: Certifier):
    bad = [p.values[0] for p in BAD_FRAMES if not (isinstance(p.values[0], np.ndarray) and p.values[0].ndim == 4)]
    frames = [good(1)[0]] + bad + [good(1)[0]]
    summary = StreamSummary()
    verdicts = list(run_stream(certifier, frames, batch=4, summary=summary))
    assert [v.status for v in verdicts] == ["uncertified"] + ["fail-safe"] * len(bad) + ["uncertified"]
    assert all(v.reason.startswith("invalid frame: ") for v in verdicts[1:-1])
    assert summary.frames_in == summary.verdicts_out == len(frames)


def test_a_source_that_raises_still_answers_the_frames_read_before_it(certifier: Certifier):
    def camera():
        for i in range(6):
            yield good(1)[0]
        raise ConnectionResetError("camera unplugged")

    summary = StreamSummary()
    verdicts = list(run_stream(certifier, camera(), batch=4, summary=summary))
    assert [v.status for v in verdicts] == ["uncertified"] * 6 + ["fail-safe"]
    assert verdicts[-1].frame == "arrays#6"
    assert verdicts[-1].reason == "source broke: arrays raised ConnectionResetError: camera unplugged"
    assert summary.frames_in == summary.verdicts_out == 7


# --- the CLI ------------------------------------------------------------------------------------------

def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_cli_run_answers_huge_and_odd_image_files(capsys, tiny_bundle: Path, tmp_path: Path, png_with_size):
    src = tmp_path / "frames"
    src.mkdir()
    Image.fromarray(good(1)[0]).save(src / "a_good.png")
    (src / "b_bomb.png").write_bytes(png_with_size(20000, 20000))
    (src / "c_big.png").write_bytes(png_with_size(16000, 9000))
    (src / "d_zero.png").write_bytes(b"")
    Image.fromarray(RNG.integers(0, 65536, (20, 24), dtype=np.uint16)).save(src / "e_gray16.png")
    Image.fromarray(RNG.integers(0, 256, (20, 24, 4), dtype=np.uint8), mode="RGBA").save(src / "f_rgba.png")
    Image.fromarray(RNG.integers(0, 256, (1, 1), dtype=np.uint8), mode="L").save(src / "g_1x1.png")
    code, out, err = cli(capsys, "run", str(src), "-b", str(tiny_bundle), "--batch", "3")
    assert code == 0
    verdicts = {v["frame"]: v for v in map(json.loads, out.splitlines())}
    assert list(verdicts) == sorted(p.name for p in src.iterdir())
    failed = {name for name, v in verdicts.items() if v["status"] == "fail-safe"}
    assert failed == {"b_bomb.png", "c_big.png", "d_zero.png"}
    assert "more than" in verdicts["c_big.png"]["reason"] and verdicts["c_big.png"]["label"] == -1
    assert err == "certinfer: 7 frames in, 7 verdicts out: 4 uncertified, 3 fail-safe (unreadable frame: 3)\n"
    code, out, err = cli(capsys, "run", str(src / "b_bomb.png"), "-b", str(tiny_bundle))
    assert code == 0 and json.loads(out)["reason"].startswith("unreadable frame: b_bomb.png: ")


def test_cli_inspect_hostile_bundles_is_one_line(capsys, tiny_bundle: Path, tmp_path: Path):
    (tiny_bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    code, out, err = cli(capsys, "inspect", str(tiny_bundle))
    assert code == 1 and out == "" and err.count("\n") == 1 and "is not valid JSON" in err

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("b/manifest.json")
        info.size = 1000
        tar.addfile(info, io.BytesIO(b" " * 1000))
    (tmp_path / "cut.tar.gz").write_bytes(buf.getvalue()[:20])
    code, out, err = cli(capsys, "inspect", str(tmp_path / "cut.tar.gz"))
    assert code == 1 and err.startswith("certinfer: error: cannot unpack bundle archive") and err.count("\n") == 1
