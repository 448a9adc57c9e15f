"""The Certifier: prepare frames -> one engine call -> certify, one Verdict per frame.

Each defense subclasses :class:`Certifier` and implements :meth:`Certifier.decide` on the engine's raw
outputs; preparation, timing, validation and the fail-safe policy live here once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from certinfer.threat import Threat
from certinfer.runtime.verdict import Certificate, Verdict


class FrameError(ValueError):
    """A frame the certifier cannot use (wrong rank, dtype, channels, size, or non-finite values)."""


class EngineRunError(RuntimeError):
    """The engine raised, or returned outputs that do not fit the batch (wrong shape, non-finite values)."""


@dataclass
class Decision:
    """What a defense decides for one frame from the engine outputs."""

    label: int
    certificate: Certificate
    status: str = ""  # empty: certified/uncertified from the certificate
    scores: list[float] | None = None
    reason: str = ""


MAX_SIDE = 16384  # larger frames are refused rather than resized (memory, and no camera sends them)
MAX_PIXELS = 1 << 26  # 67M pixels (8192 x 8192; an 8K UHD frame has 33M): a frame or image file above it is refused


def _hint_channels(c: int) -> str:
    return {1: " (grayscale? repeat it to 3 channels)", 2: " (grayscale with alpha?)",
            4: " (RGBA? composite or drop the alpha channel)"}.get(c, "")


def _hint_dtype(dtype: np.dtype) -> str:
    if np.issubdtype(dtype, np.floating):
        return " (floats? scale to 0..255 and convert to uint8)"
    if np.issubdtype(dtype, np.integer) and dtype.itemsize > 1:
        return f" ({8 * dtype.itemsize}-bit? scale to 8 bits)"
    return ""


def validate_frames(frames: np.ndarray) -> np.ndarray:
    """Check a frame batch: (N, H, W, 3) uint8 RGB; a single (H, W, 3) frame is promoted to a batch.

    Cheap checks come first (type, rank, size, channels), so a huge or misshapen array is refused before any
    pass over its values; then non-finite values (a clearer message than the dtype's), then the dtype.
    """
    if not isinstance(frames, np.ndarray):
        raise FrameError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4:
        hint = " (a grayscale frame? repeat it to 3 channels)" if frames.ndim == 2 else ""
        raise FrameError(f"frames must be (N, H, W, 3) or (H, W, 3), got shape {frames.shape}{hint}")
    n, h, w, c = frames.shape
    if min(h, w) < 1 or n < 1:
        raise FrameError(f"empty frame batch or frame, shape {frames.shape}")
    if max(h, w) > MAX_SIDE:
        raise FrameError(f"frame {h}x{w} is larger than {MAX_SIDE} pixels on a side")
    if h * w > MAX_PIXELS:
        raise FrameError(f"frame {h}x{w} has more than {MAX_PIXELS} pixels")
    if c != 3:
        raise FrameError(f"frames must have 3 (RGB) channels, got {c}{_hint_channels(c)}")
    if np.issubdtype(frames.dtype, np.floating) and not np.isfinite(frames).all():
        raise FrameError("frames contain NaN or inf values")
    if frames.dtype != np.uint8:
        raise FrameError(f"frames must be uint8 RGB, got dtype {frames.dtype}{_hint_dtype(frames.dtype)}")
    return frames


def resize(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize uint8 frames to the model input with bilinear filtering (no-op at the right size)."""
    if frames.shape[1:3] == tuple(hw):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((hw[1], hw[0]), Image.BILINEAR)) for f in frames])


class Certifier:
    """Base class: a bundle's engine plus its defense's certification math.

    Sharing: one Certifier may be called from several threads at once (e.g. one per camera) and gives each
    call the verdicts a sequential call would. Preparation and certification run concurrently (they only read
    the certifier's state); engine calls are serialized by a per-certifier lock, so each whole batch runs
    alone on the engine (onnxruntime sessions, TensorRT contexts and CUDA graphs keep per-call state), and
    engine time does not overlap between threads. For parallel engine work load one Certifier per thread.
    Do not reassign its attributes (``engine``, ``threat``...) while other threads use it, and do not share
    it across processes (load it in each process).
    """

    kind: str = "recovery"

    def __init__(self, bundle, engine, threat: Threat):
        self.bundle = bundle
        self.engine = engine
        self.manifest = bundle.manifest
        inp = self.manifest["input"]
        self.input_hw = (int(inp["hw"][0]), int(inp["hw"][1]))
        self.classes: list[str] = list(inp["classes"])
        self._mean = np.asarray(inp["mean"], np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(inp["std"], np.float32).reshape(1, -1, 1, 1)
        self.threat = threat.bind(self.input_hw)
        # Engines (onnxruntime sessions, CUDA streams) are called under one lock: a Certifier may be
        # shared by several camera threads, and each call stays a whole batch.
        self._lock = threading.Lock()

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) frames -> float32 NCHW, resized and normalized as the manifest says."""
        x = resize(validate_frames(frames), self.input_hw).astype(np.float32) / 255.0
        return np.ascontiguousarray((x.transpose(0, 3, 1, 2) - self._mean) / self._std, dtype=np.float32)

    def output_shapes(self) -> tuple[tuple[int, ...], ...] | None:
        """Per-sample shape of each engine output, where the defense knows it (checked on every call)."""
        return None

    def run_engine(self, x: np.ndarray):
        """One engine call; any failure or misshapen output raises :class:`EngineRunError`."""
        try:
            with self._lock:
                outputs = self.engine.run(x)
        except Exception as e:
            raise EngineRunError(f"engine failed: {type(e).__name__}: {e}") from e
        self._check_outputs(len(x), outputs)
        return outputs

    def _check_outputs(self, n: int, outputs) -> None:
        arrays = outputs if isinstance(outputs, tuple) else (outputs,)
        expected = self.output_shapes()
        if expected is not None and len(expected) != len(arrays):
            raise EngineRunError(f"engine returned {len(arrays)} outputs, expected {len(expected)}")
        for i, a in enumerate(arrays):
            if not isinstance(a, np.ndarray) or a.ndim < 1 or a.shape[0] != n:
                shape = getattr(a, "shape", type(a).__name__)
                raise EngineRunError(f"engine output {i} has shape {shape}, expected a batch of {n}")
            if expected is not None and a.shape[1:] != tuple(expected[i]):
                raise EngineRunError(f"engine output {i} has shape {a.shape}, expected (N, *{tuple(expected[i])})")
            if not np.isfinite(a).all():
                raise EngineRunError(f"engine output {i} has NaN or inf values")

    def decide(self, x: np.ndarray, outputs) -> list[Decision]:
        """The defense's certification on one batch's engine outputs (and its prepared input)."""
        raise NotImplementedError

    def __call__(self, frames: np.ndarray) -> list[Verdict]:
        t0 = time.perf_counter()
        x = self.prepare(frames)
        t1 = time.perf_counter()
        outputs = self.run_engine(x)
        t2 = time.perf_counter()
        decisions = self.decide(x, outputs)
        t3 = time.perf_counter()
        n = len(decisions)
        timings = {"prepare": (t1 - t0) * 1e3 / n, "engine": (t2 - t1) * 1e3 / n,
                   "certify": (t3 - t2) * 1e3 / n, "total": (t3 - t0) * 1e3 / n}
        return [self._verdict(d, timings) for d in decisions]

    def _verdict(self, d: Decision, timings: dict[str, float]) -> Verdict:
        status = d.status or ("certified" if d.certificate.certified else "uncertified")
        name = self.classes[d.label] if 0 <= d.label < len(self.classes) else ""
        return Verdict(label=int(d.label), class_name=name, status=status, certificate=d.certificate,
                       scores=d.scores, reason=d.reason, timings_ms=dict(timings), backend=self.engine.name)
