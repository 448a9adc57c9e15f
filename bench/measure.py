"""What ``certinfer bench latency`` measures on one certifier: batch-1 streaming latency, throughput at a batch
size, the building of a frame's many engine inputs against the engine, and dataset certification throughput.

Stage times are the certifier's own (``Verdict.timings_ms``, :meth:`Certifier.timed_features`): engine time is time
inside the engine only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from certinfer.runtime.certifier import Certifier

STAGES = ("prepare", "engine", "certify", "total")


def percentiles(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max())}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def take(frames: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """``n`` frames cycling through ``frames`` from ``start`` (a contiguous copy)."""
    return frames[(start + np.arange(n)) % len(frames)]


def batch1_p50_ms(certifier: Certifier, frames: np.ndarray, repeats: int = 20) -> float:
    """Batch-1 p50 over up to ``repeats`` of ``frames`` (the first call, which pays engine set-up, not counted)."""
    times = []
    for frame in frames[:repeats + 1]:
        t0 = time.perf_counter()
        certifier(frame[None])
        times.append((time.perf_counter() - t0) * 1e3)
    return round(float(np.median(times[1:])), 2)


def stream_latency(certifier: Certifier, frames: np.ndarray, n: int, warmup: int = 5,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Batch-1 streaming: one frame per call, ``n`` calls after ``warmup``; percentiles per stage and of the call."""
    for k in range(warmup):
        certifier(take(frames, 1, k))
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    wall = []
    for k in range(n):
        frame = take(frames, 1, warmup + k)
        t0 = time.perf_counter()
        verdict = certifier(frame)[0]
        wall.append((time.perf_counter() - t0) * 1e3)
        for s in STAGES:
            stages[s].append(verdict.timings_ms[s])
        if progress:
            progress(1)
    out = {"frames": n, "warmup": warmup, "stages_ms": {s: percentiles(v) for s, v in stages.items()},
           "call_ms": percentiles(wall), "frames_per_second": n / (sum(wall) / 1e3)}
    out["certify_over_engine"] = _ratio(out["stages_ms"]["certify"]["p50"], out["stages_ms"]["engine"]["p50"])
    out["prepare_over_engine"] = _ratio(out["stages_ms"]["prepare"]["p50"], out["stages_ms"]["engine"]["p50"])
    return out


def batch_throughput(certifier: Certifier, frames: np.ndarray, batch: int, seconds: float, min_calls: int = 2,
                     max_calls: int = 10000) -> dict:
    """Frames/s at one batch size: one warm-up call, then calls until ``seconds`` pass (at least ``min_calls``)."""
    x = take(frames, batch)
    certifier(x)
    sums = dict.fromkeys(STAGES, 0.0)
    calls = 0
    start = time.perf_counter()
    while calls < min_calls or (time.perf_counter() - start < seconds and calls < max_calls):
        timings = certifier(x)[0].timings_ms  # per-frame means of this call
        for s in STAGES:
            sums[s] += timings[s] * batch
        calls += 1
    wall = time.perf_counter() - start
    n = calls * batch
    per_frame = {s: v / n for s, v in sums.items()}
    return {"batch": batch, "calls": calls, "frames": n, "seconds": wall, "frames_per_second": n / wall,
            "per_frame_ms": per_frame, "certify_over_engine": _ratio(per_frame["certify"], per_frame["engine"]),
            "prepare_over_engine": _ratio(per_frame["prepare"], per_frame["engine"])}


class _Counting:
    """An engine that counts the rows it is given (everything else is the wrapped engine's)."""

    def __init__(self, engine):
        self.engine, self.rows = engine, 0

    def run(self, batch: np.ndarray):
        self.rows += len(batch)
        return self.engine.run(batch)

    def __getattr__(self, name: str):
        if name == "run_masked":  # not offered: the copies are built on the host, where their cost is measured
            raise AttributeError(name)
        return getattr(self.engine, name)


def expansion(certifier: Certifier, frames: np.ndarray, repeats: int = 3) -> dict | None:
    """Defenses that turn a frame into many engine inputs (crops, ablations, occlusions, patch boxes): the time
    spent building them (preparation beyond resizing and normalizing) against the engine's time, per frame.
    None for defenses with one engine input per frame."""
    engines = {role: _Counting(e) for role, e in certifier.engines.items()}
    counted = type(certifier)(certifier.bundle, engines, certifier.threat, certifier.options).seeded(0)
    n = len(frames)
    base, prepare, engine = (float("inf"),) * 3
    for _ in range(repeats):
        t0 = time.perf_counter()
        certifier.prepare(frames)
        base = min(base, time.perf_counter() - t0)
        _, spent = counted.timed_features(frames)
        prepare, engine = min(prepare, spent["prepare"]), min(engine, spent["engine"])
    rows = sum(e.rows for e in engines.values()) // repeats
    if rows <= n:
        return None
    build = max(prepare - base, 0.0)
    return {"frames": n, "engine_inputs_per_frame": rows // n, "build_ms_per_frame": build * 1e3 / n,
            "engine_ms_per_frame": engine * 1e3 / n, "build_over_engine": _ratio(build, engine),
            "backend": certifier.engine.name}


def dataset_throughput(certifier: Certifier, split, limit: int | None, batch: int,
                       progress: Callable[[int], None] | None = None) -> dict:
    """Certified accuracy and images/s of the whole pipeline (prepare, engine, certify) on a dataset split."""
    from certinfer.runtime.evaluate import evaluate_certifier

    x, y = (split.x[:limit], split.y[:limit]) if limit else (split.x, split.y)
    t0 = time.perf_counter()
    r = evaluate_certifier(certifier, x, y, batch=batch, progress=progress)
    wall = time.perf_counter() - t0
    return {"data": split.name, "note": split.note, "n": r["n"], "batch": batch,
            "images_per_second": r["images_per_second"], "wall_images_per_second": r["n"] / wall,
            "seconds": r["seconds"], "clean_accuracy": r["clean_accuracy"],
            "certified_accuracy": r["certified_accuracy"]["default"], "threat": r["threat"]}
