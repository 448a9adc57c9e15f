"""The soak bench (``certinfer bench soak``), run short on the tiny real ONNX bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from certinfer.bench.soak import expected_bad, frame_stream, machine
from certinfer.cli import main


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("n, every, start", [(200, 10, 0), (199, 7, 13), (5, 0, 0), (30, 1, 4), (64, 100, 0)])
def test_bad_frames_come_at_the_stated_rate(n: int, every: int, start: int):
    ids = [i for i, _ in frame_stream(n, ["good"], [("x", "bad")], every, start)]
    assert len(ids) == n
    assert sum(i.startswith("bad-") for i in ids) == expected_bad(n, every, start)
    if every:
        assert all(i.startswith("bad-") == ((start + k + 1) % every == 0) for k, i in enumerate(ids))


@pytest.mark.parametrize("cameras, batch", [(1, 1), (3, 4)])
def test_soak_answers_every_frame_and_reports_memory(capsys, tiny_bundle: Path, tmp_path: Path, cameras: int,
                                                     batch: int):
    out = tmp_path / "soak.json"
    code, stdout, err = cli(capsys, "bench", "soak", "--bundle", str(tiny_bundle), "--frames", "200",
                            "--bad-every", "10", "--cameras", str(cameras), "--batch", str(batch),
                            "--source", "random", "--out", str(out))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["ok"] and "ok; wrote" in stdout
    assert report["frames_in"] == report["verdicts_out"] == 200
    assert report["bad_frames"] == report["fail_safe"] == 20 and report["mismatches"] == {}
    assert report["statuses"] == {"uncertified": 180, "fail-safe": 20}
    assert set(report["fail_safe_reasons"]) == {"invalid frame", "unreadable frame"}
    assert report["backend"] == "onnxruntime-cpu" and report["cameras"] == cameras and report["frames_per_s"] > 0
    rss = report["rss_mb"]
    assert 0 < rss["start"] <= rss["peak"] and rss["end"] > 0 and len(rss["checkpoints"]) >= 3
    assert rss["checkpoints"][-1]["frames"] == 200
    assert err.count("soak: ") >= 3  # progress lines on stderr


def test_soak_default_result_path_names_the_machine(capsys, tiny_bundle: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, "bench", "soak", "-b", str(tiny_bundle), "--frames", "20", "--machine", "Test Box 1")
    assert code == 0, err
    report = json.loads((tmp_path / "bench" / "results" / "soak-test-box-1.json").read_text())
    assert report["machine"] == "Test Box 1" and report["frames_in"] == 20
    info, tag = machine()
    assert info["cores"] >= 1 and tag and "/" not in tag
