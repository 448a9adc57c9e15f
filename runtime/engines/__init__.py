"""Engines: run a bundle's graph on a batch, whatever the backend.

Every backend takes one input array with a fixed dtype and per-sample shape and a dynamic batch axis, and
returns one array (one graph output) or a tuple (several), each with the batch axis first. Batches outside the
engine's batch range are chunked (and a short last chunk padded) by :class:`ChunkedEngine`, for all backends.
A backend may also build masked copies of its input where it runs (``run_masked``, the torch backend on its
device; see :class:`DeviceMasking`), which double masking uses where offered.
Backend modules are imported only when chosen: tensorrt, cuda-python and torch are optional, and the runtime
itself never imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

Outputs = np.ndarray | tuple[np.ndarray, ...]

CACHE_ENV = "CERTINFER_CACHE_DIR"
OPT_BATCH = 64  # the batch TensorRT profiles are tuned for, clamped to the engine's range (certify's default)

BACKENDS = ("auto", "onnxruntime", "ort", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt",
            "tensorrt", "torch", "torch-cpu", "torch-cuda", "torch-cuda-graphs")


class EngineError(RuntimeError):
    """A backend that is missing, a bundle without a matching engine, or a batch the engine cannot take."""


def cache_dir() -> Path:
    """certinfer's user cache folder: ``$CERTINFER_CACHE_DIR``, else ``$XDG_CACHE_HOME/certinfer``, else
    ``~/.cache/certinfer``. TensorRT timing and calibration caches and onnxruntime's TensorRT engines live here."""
    if root := os.environ.get(CACHE_ENV):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "certinfer"


def opt_batch(batch: list[int] | tuple[int, int], preferred: int | None = None) -> int:
    """The batch a TensorRT optimization profile is tuned for: ``preferred`` (default OPT_BATCH) within [min, max]."""
    lo, hi = batch
    return min(max(preferred or OPT_BATCH, lo), hi)


@runtime_checkable
class Engine(Protocol):
    name: str  # e.g. "onnxruntime-cpu", "tensorrt", "torch-cuda-graphs"; reported in every Verdict
    max_batch: int
    precision: str  # what it computes in: "fp32", "fp16", "int8" (certificates needing exactness ask for fp32)

    def run(self, batch: np.ndarray) -> Outputs: ...


@runtime_checkable
class DeviceMasking(Protocol):
    """An engine that builds masked copies itself: ``run_masked`` returns what ``run`` gives on the copies
    ``base[frames[r]]`` with the positions ``masks[a[r]] | masks[b[r]]`` (bool (K, H, W)) set to ``value`` (a
    scalar or one per channel), bit for bit and in the same chunks, so only the frames and indices travel."""

    def run_masked(self, base: np.ndarray, masks: np.ndarray, frames: np.ndarray, a: np.ndarray, b: np.ndarray,
                   value: np.ndarray) -> Outputs: ...


def _head(out: Outputs, n: int) -> Outputs:
    return out[:n] if isinstance(out, np.ndarray) else tuple(o[:n] for o in out)


def _concat(parts: list[Outputs]) -> Outputs:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return tuple(np.concatenate(group) for group in zip(*parts))


def run_chunked(fn: Callable[[np.ndarray], Outputs], batch: np.ndarray, max_batch: int, min_batch: int = 1) -> Outputs:
    """``fn`` over chunks of at most ``max_batch`` samples, outputs concatenated along the batch axis.

    A chunk smaller than ``min_batch`` (a TensorRT profile may start above 1) is padded by repeating its last
    sample, and the padding's outputs are dropped.
    """
    n = len(batch)
    if min_batch <= n <= max_batch:
        return fn(batch)
    parts = []
    for i in range(0, n, max_batch):
        chunk = batch[i:i + max_batch]
        k = len(chunk)
        if k < min_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], min_batch - k, axis=0)])
        parts.append(_head(fn(chunk), k))
    return _concat(parts)


class ChunkedEngine:
    """Base of the backends: checks the batch, then runs ``_run`` on chunks within ``[min_batch, max_batch]``."""

    name: str
    max_batch: int
    min_batch: int = 1
    precision: str
    input_dtype: np.dtype
    input_shape: tuple[int | None, ...] | None  # per sample; None entries are free, None overall: unchecked

    def run(self, batch: np.ndarray) -> Outputs:
        return run_chunked(self._run, self._check(batch), self.max_batch, self.min_batch)

    def _run(self, batch: np.ndarray) -> Outputs:
        raise NotImplementedError

    def _check(self, batch: np.ndarray) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            raise EngineError(f"{self.name}: batch must be a numpy array, got {type(batch).__name__}")
        if batch.dtype != self.input_dtype:
            raise EngineError(f"{self.name} takes {self.input_dtype} input, got {batch.dtype}")
        shape = self.input_shape
        if batch.ndim == 0 or len(batch) == 0 or shape is not None and (
                batch.ndim != len(shape) + 1 or any(s is not None and s != b for s, b in zip(shape, batch.shape[1:]))):
            want = "(N>0, " + ", ".join("?" if s is None else str(s) for s in shape or ()) + ")"
            raise EngineError(f"{self.name} takes batches of shape {want}, got {batch.shape}")
        return np.ascontiguousarray(batch)


def engine_entry(bundle, fmt: str, role: str = "model") -> dict:
    """The bundle's first engine entry of a format for a role, or a clear error."""
    for e in bundle.engines(role):
        if e["format"] == fmt:
            return e
    raise EngineError(f"bundle {bundle.path} has no {fmt} engine for role {role!r}")


def _onnxruntime(bundle, backend: str, role: str, options: dict) -> Engine:
    from certinfer.runtime.engines.onnxruntime_engine import OnnxRuntimeEngine

    provider = "best" if backend in ("auto", "onnxruntime", "ort") else backend.removeprefix("onnxruntime-")
    return OnnxRuntimeEngine(bundle, engine_entry(bundle, "onnx", role), provider=provider, **options)


def _torch(bundle, backend: str, role: str, options: dict) -> Engine:
    from certinfer.runtime.engines.torch_engine import TorchEngine

    forced = {"torch": {}, "torch-cpu": {"device": "cpu"}, "torch-cuda": {"device": "cuda"},
              "torch-cuda-graphs": {"device": "cuda", "cuda_graphs": True}}[backend]
    return TorchEngine(bundle, engine_entry(bundle, "torch", role), **{**options, **forced})


def load_engine(bundle, backend: str = "auto", role: str = "model", **options) -> Engine:
    """An engine for one of the bundle's graphs.

    ``auto``: native TensorRT when ``tensorrt`` imports, a CUDA GPU is present and the bundle has a plan built
    for this GPU and TensorRT version; else onnxruntime with its CUDA provider where it works; else onnxruntime
    on the CPU. ``options`` go to the backend (``device_id``, ``threads``, ``fp16``, ``cache_dir``, ``builder``).
    """
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("auto", "tensorrt"):
        from certinfer.runtime.engines import tensorrt_engine

        device_id = options.get("device_id", 0)
        if backend == "tensorrt":
            return tensorrt_engine.TensorRTEngine(bundle, tensorrt_engine.select_entry(bundle, role, device_id),
                                                  **options)
        entry = tensorrt_engine.matching_entry(bundle, role, device_id)
        if entry is not None:
            return tensorrt_engine.TensorRTEngine(bundle, entry, device_id=device_id)
    if backend.startswith("torch"):
        return _torch(bundle, backend, role, options)
    return _onnxruntime(bundle, backend, role, options)
