"""One Certifier shared by several threads (cameras) gives exactly the verdicts of sequential use.

Real ONNX engines: the tiny argmax classifier from conftest, and a tiny BagCert code-map graph built here (so
certificates vary: solid frames certify, noisy ones do not). Engine calls are serialized per Certifier.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import certinfer
from certinfer.export.bundle_writer import write_bundle
from certinfer.runtime.certifier import Certifier, EngineRunError
from certinfer.runtime.frames import FrameError
from certinfer.runtime.stream import run_stream

THREADS = 8
HW = (16, 16)


@pytest.fixture(autouse=True)
def _switch_often():
    """Thread switches every few microseconds, so threads interleave inside prepare, engine and certify."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def _export_tiny_bagcert(path: Path) -> Path:
    """A 3x3 local scorer for 4 classes (red, green, blue, dark) emitting the BagCert uint8 code map."""
    import torch

    torch.set_num_threads(1)

    class CodeMap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            w = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]])
            with torch.no_grad():
                self.conv.weight.copy_(w[:, :, None, None].expand(4, 3, 3, 3) / 9)
                self.conv.bias.copy_(torch.tensor([-0.8, -0.8, -0.8, -2.5]))

        def forward(self, x):
            z = self.conv(x)
            code = (z >= 0).to(torch.uint8) + 2 * (z.abs() < 0.05).to(torch.uint8)
            return code.permute(0, 2, 3, 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(CodeMap().eval(), (torch.zeros(2, 3, *HW),), str(path), input_names=["input"],
                          output_names=["scores"], dynamic_axes={"input": {0: "n"}, "scores": {0: "n"}}, dynamo=False)
    return path


@pytest.fixture(scope="module")
def bagcert_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bagcert")
    manifest = {
        "defense": {"kind": "bagcert", "params": {"condition": "3.2"}},
        "input": {"hw": list(HW), "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                  "classes": ["red", "green", "blue", "dark"], "resize": "bilinear"},
        "geometry": {"rf": [3, 3], "stride": [1, 1], "padding": [1, 1], "input_hw": list(HW), "output_hw": list(HW)},
        "threat": "2x2,area:3",
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "batch": [1, 16]}],
        "probe": {"exact_backends": []},  # no trusted backend: cells near the threshold count as adversarial
        "provenance": {"dataset": "none", "commit": "test"},
    }
    return write_bundle(root / "bundle", manifest, {"model.onnx": _export_tiny_bagcert(root / "model.onnx")})


def _batches(seed: int = 0) -> list[np.ndarray]:
    """Batches of 1..20 frames (20 > the engine's max batch 16: chunked under the lock), several frame sizes,
    solid colours (certifiable) and noise (not)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [5, 5, 5], [128, 128, 128]], np.uint8)
    out = []
    for i, n in enumerate([1, 3, 20, 2, 16, 5, 1, 9, 17, 4, 2, 6]):
        h, w = [(16, 16), (24, 20), (40, 30), (8, 12)][i % 4]
        solid = colours[rng.integers(0, len(colours), n)][:, None, None, :]
        noise = rng.integers(-40, 41, (n, h, w, 3))
        mix = rng.random(n) < 0.5
        frames = np.where(mix[:, None, None, None], rng.integers(0, 256, (n, h, w, 3)), solid + noise)
        out.append(np.clip(frames, 0, 255).astype(np.uint8))
    return out


def _key(v) -> tuple:
    """Everything in a Verdict but its timings."""
    return v.label, v.class_name, v.status, v.certificate, v.scores, v.reason, v.backend


def _hammer(certifier: Certifier, batches: list[np.ndarray], threads: int = THREADS, rounds: int = 2) -> None:
    expected = [[_key(v) for v in certifier(b)] for b in batches]
    start = threading.Barrier(threads)

    def worker(t: int) -> list[tuple[int, list]]:
        order = np.random.default_rng(t).permutation(np.tile(np.arange(len(batches)), rounds))
        start.wait()
        return [(int(i), [_key(v) for v in certifier(batches[i])]) for i in order]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads)))
    for t, done in enumerate(results):
        assert len(done) == rounds * len(batches)
        for i, got in done:
            assert got == expected[i], f"thread {t}, batch {i}: verdicts differ from sequential use"


def test_shared_argmax_certifier_matches_sequential(certifier: Certifier):
    _hammer(certifier, _batches(1))


def test_shared_bagcert_certifier_matches_sequential(bagcert_bundle: Path):
    certifier = certinfer.load(bagcert_bundle, backend="onnxruntime-cpu")
    batches = _batches(2)
    statuses = {v.status for b in batches for v in certifier(b)}
    assert statuses == {"certified", "uncertified"}, statuses  # the comparison covers real certificates
    _hammer(certifier, batches)


class CountingEngine:
    """Wraps a real engine; records how many calls run at once, and fails every batch of 7 frames."""

    def __init__(self, inner):
        self.inner, self.name, self.max_batch = inner, inner.name, inner.max_batch
        self.active = self.peak = self.calls = 0
        self._count = threading.Lock()

    def run(self, batch: np.ndarray):
        with self._count:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(0.0005)  # widen the window in which an unserialized call would overlap
            if len(batch) == 7:
                raise RuntimeError("CUDA error: device lost")
            return self.inner.run(batch)
        finally:
            with self._count:
                self.active -= 1


def test_engine_calls_never_overlap_and_failures_stay_with_their_caller(certifier: Certifier):
    engine = certifier.engines["model"] = CountingEngine(certifier.engine)
    good = _batches(3)
    expected = [[_key(v) for v in certifier(b)] for b in good]
    poison = np.zeros((7, 16, 16, 3), np.uint8)  # the engine raises on it
    invalid = np.zeros((2, 16, 16, 4), np.uint8)  # refused before the engine

    def worker(t: int) -> None:
        for i in np.random.default_rng(t).permutation(len(good)):
            with pytest.raises(EngineRunError, match="device lost"):
                certifier(poison)
            with pytest.raises(FrameError, match="RGBA"):
                certifier(invalid)
            assert [_key(v) for v in certifier(good[i])] == expected[i]

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(worker, range(THREADS)))
    assert engine.peak == 1 and engine.calls == len(good) * (1 + 2 * THREADS)
    assert not certifier._lock.locked()


def test_streams_from_several_cameras_share_one_certifier(certifier: Certifier):
    rng = np.random.default_rng(4)

    def camera_frames(c: int) -> list:
        frames = [rng.integers(0, 256, (16 + c, 20, 3), dtype=np.uint8) for _ in range(12)]
        frames[5] = np.full((16, 20, 3), np.nan, np.float32)  # fail-safe, and the stream goes on
        return frames

    cameras = [camera_frames(c) for c in range(6)]
    expected = [[_key(v) for v in run_stream(certifier, frames, batch=c % 3 + 1)] for c, frames in enumerate(cameras)]

    def camera(c: int) -> list:
        return [_key(v) for v in run_stream(certifier, cameras[c], batch=c % 3 + 1)]

    with ThreadPoolExecutor(len(cameras)) as pool:
        assert list(pool.map(camera, range(len(cameras)))) == expected
    assert all(sum(k[2] == "fail-safe" for k in e) == 1 for e in expected)
