"""``certinfer bench latency``: how fast a bundle certifies, per backend, and how fast its certification math is.

For a bundle and each backend that loads here (onnxruntime CPU/CUDA/TensorRT, native TensorRT, torch CPU/CUDA
where the bundle has a torch entry; the others are recorded as skipped with the reason):

* streaming latency at batch 1: p50/p90/p99 over N frames of each stage (prepare / engine / certify / total,
  from ``Verdict.timings_ms``) and of the wall time of the whole call;
* throughput at several batch sizes and the best of them, with the per-frame stage split;
* certification overhead as a share of engine time (batch 1 and best batch), and the process's peak RSS;
* for defenses that turn a frame into many engine inputs (randomized cropping's crops, DRS ablations), the time
  to build them against the engine's time on them (:func:`expansion`);
* dataset certification throughput (images/s through :func:`certinfer.runtime.evaluate.evaluate_certifier`)
  on a dataset split, when one is given.

Once per bundle, on the same engine outputs: the vectorized certification math against the plain reference
written from the paper (:mod:`certinfer.bench.reference` for BagCert, ``masking_reference`` for PatchGuard,
``cropping_reference`` for randomized cropping), its speed-up factor, and a check that both give identical
certificates (certified flag and margin for every rectangle); a mismatch fails the benchmark.

Results go to ``<out_dir>/<name>-<machine>.json`` (machine, versions, git commit, date) and a ``.png`` plot.
Nothing here imports torch unless a torch backend is asked for and the bundle has a torch engine.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from certinfer.provenance import git_commit

STAGES = ("prepare", "engine", "certify", "total")
DEFAULT_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "torch-cpu",
                    "torch-cuda", "torch-cuda-graphs")
DEFAULT_BATCHES = (1, 8, 32, 128, 512)
# issue 7's targets
TARGET_OVERHEAD = 0.05  # certification at most 5% of the engine's time (BagCert, PatchGuard)
TARGET_PREP = 0.10  # building crops (and ablations, occlusions) at most 10% of the engine's time
TARGET_SPEEDUP = 100.0  # vectorized certifiers at least 100x faster than the plain references
TARGET_FPS = 200.0  # default bundle on the CPU: at least 200 certified frames/s at the best batch ...
TARGET_P99_MS = 20.0  # ... and p99 below 20 ms at batch 1

CPU_NOTE = ("Measured on a CPU-only machine: the ratios (certification overhead as a share of engine time, "
            "vectorized vs reference speed-up) are meaningful here; absolute times depend on this CPU and its load "
            "and say nothing about GPU latency, which only a GPU machine can measure.")
GPU_NOTE = ("Measured on a GPU machine: absolute engine times are this GPU's; certification and preparation run "
            "on the host CPU.")


# --- machine, versions, provenance -----------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _gpus() -> list[dict]:
    """GPUs as nvidia-smi lists them (no CUDA library is loaded for this); empty without one."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if parts and parts[0]:
            gpus.append({"name": parts[0], "memory": parts[1] if len(parts) > 1 else "",
                         "driver": parts[2] if len(parts) > 2 else ""})
    return gpus


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict:
    """The machine: CPU model, cores (all and usable by this process), memory, GPUs, OS."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "memory_gib": _memory_gib(),
            "gpus": _gpus(), "platform": platform.platform()}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(info: dict) -> str:
    """A short file-name tag for the machine: the GPU's name, else the CPU model and its cores."""
    if info["gpus"]:
        return _slug(info["gpus"][0]["name"])
    return f"{_slug(info['cpu'])}-{info['cores']}c"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    """Versions of what the numbers depend on (read from package metadata: nothing optional is imported)."""
    import onnxruntime

    v = {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
         "onnxruntime_providers": onnxruntime.get_available_providers()}
    for dist in ("certinfer", "onnxruntime-gpu", "torch", "tensorrt"):
        if (found := _version(dist)) is not None:
            v[dist] = found
    return v


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (a high-water mark: it never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


# --- measurements --------------------------------------------------------------------------------------

def percentiles(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max())}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def take(frames: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """``n`` frames cycling through ``frames`` from ``start`` (a contiguous copy)."""
    return frames[(start + np.arange(n)) % len(frames)]


def load_certifier(bundle: Path, backend: str, threat: str | None = None, threads: int | None = None):
    """A Certifier on one backend; ``threads`` caps the engine's CPU threads (onnxruntime, torch)."""
    from certinfer.runtime.bundle import load_bundle
    from certinfer.runtime.defenses import certifier_class
    from certinfer.runtime.engines import load_engine
    from certinfer.threat import parse

    loaded = load_bundle(bundle)
    options = {"threads": threads} if threads and backend.startswith(("onnxruntime", "ort", "auto")) else {}
    engine = load_engine(loaded, backend=backend, **options)
    if threads and backend.startswith("torch") and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    spec = loaded.manifest["threat"] if threat is None else threat
    threat = parse(spec, input_hw=tuple(loaded.manifest["input"]["hw"]))  # a percentage threat needs the input size
    return certifier_class(loaded.manifest["defense"]["kind"])(loaded, engine, threat)


def stream_latency(certifier, frames: np.ndarray, n: int, warmup: int = 5,
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


def batch_throughput(certifier, frames: np.ndarray, batch: int, seconds: float, min_calls: int = 2,
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


def load_split(data: str, hw: tuple[int, int]):
    """A dataset split as uint8 images at the model input size (numpy + PIL only, no torch)."""
    from certinfer.train import data as datasets

    return datasets.load(data, hw=hw)


def dataset_throughput(certifier, split, limit: int | None, batch: int,
                       progress_factory: Callable | None = None) -> dict:
    """Certified accuracy and images/s of the whole pipeline (prepare, engine, certify) on a dataset split."""
    from certinfer.runtime.evaluate import evaluate_certifier

    x, y = (split.x[:limit], split.y[:limit]) if limit else (split.x, split.y)
    advance = progress_factory(len(y)) if progress_factory else None
    t0 = time.perf_counter()
    r = evaluate_certifier(certifier, x, y, batch=batch, progress=advance)
    wall = time.perf_counter() - t0
    return {"data": split.name, "note": split.note, "n": r["n"], "batch": batch,
            "images_per_second": r["images_per_second"], "wall_images_per_second": r["n"] / wall,
            "seconds": r["seconds"], "clean_accuracy": r["clean_accuracy"],
            "certified_accuracy": r["certified_accuracy"]["default"], "threat": r["threat"]}


# --- certification math vs the plain reference ---------------------------------------------------------

def _best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def compare_certificates(fast, slow, rtol: float = 0.0) -> list[str]:
    """Differences between two certificates (flag, or margin beyond ``rtol``, of any rectangle); empty when equal.

    Integer margins (BagCert votes) compare exactly; float sums (PatchGuard evidence) added up in a different
    order differ in the last bits, so they compare within ``rtol``.
    """
    diffs = []
    if set(fast.per_rect) != set(slow.per_rect):
        return [f"rectangles differ: {sorted(fast.per_rect)} vs {sorted(slow.per_rect)}"]
    for key, a in fast.per_rect.items():
        b = slow.per_rect[key]
        if a.certified != b.certified or abs(a.margin - b.margin) > rtol * max(1.0, abs(b.margin)):
            diffs.append(f"{key}: vectorized ({a.certified}, {a.margin}) vs reference ({b.certified}, {b.margin})")
    if fast.certified != slow.certified:
        diffs.append(f"threat: vectorized {fast.certified} vs reference {slow.certified}")
    return diffs


def bagcert_math(certifier, frames: np.ndarray, n_vectorized: int, n_reference: int,
                 progress: Callable[[int], None] | None = None, repeats: int = 3) -> dict:
    """BagCert: vectorized ``bagcert.certify`` vs :func:`reference.certify_reference` on the same binary maps.

    The maps come from one engine pass over ``n_vectorized`` frames. The vectorized math is timed on all of them,
    batched (one call) and one frame per call (as a batch-1 stream pays it); the reference on the first
    ``n_reference``, extrapolated per frame. Raises AssertionError unless every certificate is identical.
    """
    from certinfer.bench.reference import certify_reference
    from certinfer.runtime.defenses import bagcert

    n_reference = min(n_reference, n_vectorized)
    x = certifier.prepare(take(frames, n_vectorized))
    outputs = certifier.run_engine(x)
    scores, near = bagcert.split_code(outputs[0] if isinstance(outputs, tuple) else outputs)
    _, labels = bagcert.predict(scores)
    uncertain = None if certifier.trust_near else near
    g, threat = certifier.geometry, certifier.threat

    def vectorized():
        return bagcert.certify(scores, labels, g, threat, condition="3.2", uncertain=uncertain)

    def one_by_one():
        return [bagcert.certify(scores[i], int(labels[i]), g, threat, condition="3.2",
                                uncertain=None if uncertain is None else uncertain[i]) for i in range(len(labels))]

    t_batched, fast = _best_of(vectorized, repeats)
    t_single, single = _best_of(one_by_one, repeats)
    slow, t_ref = [], 0.0
    for i in range(n_reference):
        t0 = time.perf_counter()
        slow.append(certify_reference(scores[i], int(labels[i]), g, threat,
                                      uncertain=None if uncertain is None else uncertain[i]))
        t_ref += time.perf_counter() - t0
        if progress:
            progress(1)
    mismatches = []
    for i in range(n_reference):
        mismatches += [f"frame {i}: {d}" for d in compare_certificates(fast[i], slow[i])]
        mismatches += [f"frame {i} (one by one): {d}" for d in compare_certificates(single[i], fast[i])]
    if mismatches:
        raise AssertionError("vectorized and reference BagCert certificates differ: " + "; ".join(mismatches[:5]))
    ms = {"vectorized_batched": t_batched * 1e3 / n_vectorized, "vectorized_one_frame_per_call": t_single * 1e3 / n_vectorized,
          "reference": t_ref * 1e3 / max(n_reference, 1)}
    certified = [c.certified for c in fast[:n_reference]]
    return {
        "defense": "bagcert", "condition": "3.2", "threat": str(threat), "rects": list(threat.keys),
        "maps_from_backend": certifier.engine.name, "map_shape": list(scores.shape[1:]),
        "uncertain_cells_used": uncertain is not None,
        "reference": "certinfer.bench.reference.certify_reference: loops over locations, outputs and classes",
        "frames_vectorized": n_vectorized, "frames_reference": n_reference, "repeats_vectorized": repeats,
        "ms_per_frame": ms,
        "speedup": _ratio(ms["reference"], ms["vectorized_one_frame_per_call"]),
        "speedup_batched": _ratio(ms["reference"], ms["vectorized_batched"]),
        "identical_certificates": True, "frames_compared": n_reference,
        "certified_among_compared": int(sum(certified)),
    }


def masking_math(certifier, frames: np.ndarray, n_vectorized: int, n_reference: int,
                 progress: Callable[[int], None] | None = None, repeats: int = 3) -> dict:
    """PatchGuard: summed-area-table ``masking.certify_features`` vs the loop reference on the same local features."""
    from certinfer.bench.masking_reference import certify_reference
    from certinfer.runtime.defenses import masking

    n_reference = min(n_reference, n_vectorized)
    x = certifier.prepare(take(frames, n_vectorized))
    z = certifier.run_engine(x)
    agg, g, threat = certifier.aggregation, certifier.geometry, certifier.threat
    u = agg.features(z)
    labels = masking.evidence(u, g, threat, agg.threshold).argmax(axis=-1)

    def vectorized():
        return masking.certify_features(u, labels, g, threat, agg)

    def one_by_one():
        return [masking.certify_features(u[i:i + 1], labels[i:i + 1], g, threat, agg)[0] for i in range(len(labels))]

    t_batched, fast = _best_of(vectorized, repeats)
    t_single, single = _best_of(one_by_one, repeats)
    slow, t_ref = [], 0.0
    for i in range(n_reference):
        t0 = time.perf_counter()
        slow.append(certify_reference(z[i], int(labels[i]), g, threat, agg))
        t_ref += time.perf_counter() - t0
        if progress:
            progress(1)
    mismatches = []
    for i in range(n_reference):
        mismatches += [f"frame {i}: {d}" for d in compare_certificates(fast[i], slow[i], rtol=1e-9)]
        mismatches += [f"frame {i} (one by one): {d}" for d in compare_certificates(single[i], fast[i], rtol=1e-9)]
    if mismatches:
        raise AssertionError("vectorized and reference masking certificates differ: " + "; ".join(mismatches[:5]))
    ms = {"vectorized_batched": t_batched * 1e3 / n_vectorized,
          "vectorized_one_frame_per_call": t_single * 1e3 / n_vectorized,
          "reference": t_ref * 1e3 / max(n_reference, 1)}
    return {
        "defense": "masking", "params": certifier.manifest["defense"].get("params", {}), "threat": str(threat),
        "rects": list(threat.keys), "maps_from_backend": certifier.engine.name, "map_shape": list(z.shape[1:]),
        "reference": "certinfer.bench.masking_reference.certify_reference: loops over locations, windows and classes",
        "frames_vectorized": n_vectorized, "frames_reference": n_reference, "repeats_vectorized": repeats,
        "ms_per_frame": ms,
        "speedup": _ratio(ms["reference"], ms["vectorized_one_frame_per_call"]),
        "speedup_batched": _ratio(ms["reference"], ms["vectorized_batched"]),
        "identical_certificates": True, "margin_rtol": 1e-9, "frames_compared": n_reference,
        "certified_among_compared": int(sum(c.certified for c in fast[:n_reference])),
    }


def cropping_math(certifier, frames: np.ndarray, n_vectorized: int, n_reference: int,
                  progress: Callable[[int], None] | None = None, repeats: int = 3) -> dict:
    """Randomized cropping: vote counting + ``cropping.vote_certificates`` vs the loop reference on the same crop
    logits (one engine pass; crops drawn from a fixed seed, which is for benchmarks only)."""
    from certinfer.bench.cropping_reference import certify_reference

    n_reference = min(n_reference, n_vectorized)
    certifier.fix_seed(0)
    x = certifier.prepare(take(frames, n_vectorized))
    outputs = certifier.run_engine(x)
    logits = outputs[0]
    exhaustive = certifier.mode == "exhaustive"

    def vectorized():
        return [d.certificate for d in certifier.decide(x, outputs)]

    def one_by_one():
        return [certifier.decide(x[i:i + 1], (logits[i:i + 1], outputs[1][i:i + 1]))[0].certificate
                for i in range(len(logits))]

    t_batched, fast = _best_of(vectorized, repeats)
    t_single, single = _best_of(one_by_one, repeats)
    slow, t_ref = [], 0.0
    for i in range(n_reference):
        t0 = time.perf_counter()
        slow.append(certify_reference(logits[i], certifier.input_hw, certifier.crop_hw, certifier.threat,
                                      certifier.replace, certifier.threshold, exhaustive))
        t_ref += time.perf_counter() - t0
        if progress:
            progress(1)
    mismatches = []
    for i in range(n_reference):
        mismatches += [f"frame {i}: {d}" for d in compare_certificates(fast[i], slow[i])]
        mismatches += [f"frame {i} (one by one): {d}" for d in compare_certificates(single[i], fast[i])]
    if mismatches:
        raise AssertionError("vectorized and reference cropping certificates differ: " + "; ".join(mismatches[:5]))
    ms = {"vectorized_batched": t_batched * 1e3 / n_vectorized,
          "vectorized_one_frame_per_call": t_single * 1e3 / n_vectorized,
          "reference": t_ref * 1e3 / max(n_reference, 1)}
    return {
        "defense": "cropping", "params": certifier.manifest["defense"].get("params", {}), "threat": str(certifier.threat),
        "rects": list(certifier.threat.keys), "maps_from_backend": certifier.engine.name,
        "map_shape": list(logits.shape[1:]),
        "reference": "certinfer.bench.cropping_reference.certify_reference: loops over crops, classes, patch and crop "
                     "positions, and the terms of the overlap tail",
        "frames_vectorized": n_vectorized, "frames_reference": n_reference, "repeats_vectorized": repeats,
        "ms_per_frame": ms,
        "speedup": _ratio(ms["reference"], ms["vectorized_one_frame_per_call"]),
        "speedup_batched": _ratio(ms["reference"], ms["vectorized_batched"]),
        "identical_certificates": True, "frames_compared": n_reference,
        "certified_among_compared": int(sum(c.certified for c in fast[:n_reference])),
    }


def scalecert_math(certifier, frames: np.ndarray, n_vectorized: int, n_reference: int,
                   progress: Callable[[int], None] | None = None, repeats: int = 3) -> dict:
    """ScaleCert: the runtime's window selection + Algorithms 1 and 2 (``decide`` on one run_engine's outputs) vs the
    loop reference (pixel-by-pixel R, window by window) fed the same engine outputs from a lookup table, so both
    time the math only. A window the reference evaluates that the runtime did not is a KeyError (a mismatch)."""
    from certinfer.bench import scalecert_reference as ref

    n_reference = min(n_reference, n_vectorized)
    x = certifier.prepare(take(frames, n_vectorized))
    outputs = certifier.run_engine(x)
    logits0, keep, occ = outputs
    (key, fam), = certifier.families().items()  # the reference takes one rectangle
    rect = fam.rect

    def vectorized():
        return certifier.decide(x, outputs)

    def one_by_one():
        return [certifier.decide(x[i:i + 1], (logits0[i:i + 1], keep[i:i + 1],
                                              {k: (s[i:i + 1], z[i:i + 1]) for k, (s, z) in occ.items()}))[0]
                for i in range(len(x))]

    def table(i: int):
        rows = {fam.masks[f].tobytes(): occ[key][1][i, f] for f in np.flatnonzero(occ[key][0][i])}
        empty = np.zeros(certifier.input_hw, np.float32).tobytes()
        return lambda b: ((logits0[i:i + 1], keep[i:i + 1]) if b[0, -1].tobytes() == empty
                          else (rows[b[0, -1].tobytes()][None], None))

    t_batched, fast = _best_of(vectorized, repeats)
    t_single, single = _best_of(one_by_one, repeats)
    mismatches, t_ref = [], 0.0
    for i in range(n_reference):
        t0 = time.perf_counter()
        cert = ref.certify_reference(table(i), x[i], certifier.geometry, rect, certifier.r, certifier.tau)
        alert = ref.detect_reference(table(i), x[i], certifier.geometry, rect, certifier.r, certifier.tau) == "alert"
        t_ref += time.perf_counter() - t0
        if (cert, alert) != (fast[i].certificate.certified, fast[i].status == "alert") or \
                (single[i].label, single[i].status) != (fast[i].label, fast[i].status):
            mismatches.append(f"frame {i}: reference ({cert}, alert {alert}) vs vectorized "
                              f"({fast[i].certificate.certified}, {fast[i].status or 'label'})")
        if progress:
            progress(1)
    if mismatches:
        raise AssertionError("vectorized and reference ScaleCert decisions differ: " + "; ".join(mismatches[:5]))
    ms = {"vectorized_batched": t_batched * 1e3 / n_vectorized,
          "vectorized_one_frame_per_call": t_single * 1e3 / n_vectorized,
          "reference": t_ref * 1e3 / max(n_reference, 1)}
    return {
        "defense": "scalecert", "params": certifier.manifest["defense"].get("params", {}), "threat": str(certifier.threat),
        "rects": [key], "maps_from_backend": certifier.engine.name, "map_shape": list(keep.shape[1:]),
        "reference": "certinfer.bench.scalecert_reference: loops over winners and pixels (R), windows and patch "
                     "positions; engine outputs looked up from the runtime's own pass",
        "frames_vectorized": n_vectorized, "frames_reference": n_reference, "repeats_vectorized": repeats,
        "ms_per_frame": ms,
        "speedup": _ratio(ms["reference"], ms["vectorized_one_frame_per_call"]),
        "speedup_batched": _ratio(ms["reference"], ms["vectorized_batched"]),
        "identical_certificates": True, "frames_compared": n_reference,
        "certified_among_compared": int(sum(d.certificate.certified for d in fast[:n_reference])),
    }


def ibp_math(certifier, frames: np.ndarray, n_vectorized: int, n_reference: int,
             progress: Callable[[int], None] | None = None, repeats: int = 3) -> dict:
    """IBP: the runtime's whole certificate (patch boxes, bounds engine, minimum over locations, ``ibp.certify``:
    ``run_engine`` + ``decide``) vs the plain float64 reference (loops over locations, pixels, convolution windows
    and class pairs; ``bench/ibp_reference.py``) on the bundle's weights, on one reference frame (minutes
    each). The bounds are the math here, so the engine's time is counted; margins agree to float32 rounding."""
    from safetensors.torch import load

    from certinfer.bench import ibp_reference as ref
    from certinfer.runtime.verdict import Certificate, RectCert
    from certinfer.train.models import build

    n_reference = min(n_reference, n_vectorized, 1)
    entry = next(e for e in certifier.bundle.engines("bounds") if e["format"] == "torch")
    net = build(entry["config"])
    net.load_state_dict(load(certifier.bundle.read(entry)))
    layers = ref.layers_of(net)
    x = certifier.prepare(take(frames, n_vectorized))

    def vectorized():
        return [d.certificate for d in certifier.decide(x, certifier.run_engine(x))]

    def one_by_one():
        return [certifier.decide(x[i:i + 1], certifier.run_engine(x[i:i + 1]))[0].certificate for i in range(len(x))]

    t_batched, fast = _best_of(vectorized, repeats)
    t_single, _ = _best_of(one_by_one, 1)
    labels = certifier.logits(x).argmax(axis=1)
    mismatches, t_ref = [], 0.0
    for i in range(n_reference):
        t0 = time.perf_counter()
        per_rect = {}
        for rect in certifier.threat.rects:
            m = ref.min_margins_reference(layers, x[i], rect, certifier.patch_lo, certifier.patch_hi)
            per_rect[f"{rect[0]}x{rect[1]}"] = RectCert(*ref.certificate_reference(m, int(labels[i]),
                                                                                   certifier.tolerance))
        t_ref += time.perf_counter() - t0
        mismatches += [f"frame {i}: {d}" for d in compare_certificates(
            fast[i], Certificate.from_rects(str(certifier.threat), per_rect), rtol=1e-3)]
        if progress:
            progress(1)
    if mismatches:
        raise AssertionError("runtime and reference IBP certificates differ: " + "; ".join(mismatches[:5]))
    ms = {"vectorized_batched": t_batched * 1e3 / n_vectorized,
          "vectorized_one_frame_per_call": t_single * 1e3 / n_vectorized,
          "reference": t_ref * 1e3 / max(n_reference, 1)}
    return {
        "defense": "ibp", "params": certifier.manifest["defense"].get("params", {}), "threat": str(certifier.threat),
        "rects": list(certifier.threat.keys), "maps_from_backend": certifier.bounds.name,
        "map_shape": [len(certifier.classes)] * 2,
        "reference": "certinfer.bench.ibp_reference: float64 interval bounds with loops over locations, pixels, "
                     "convolution windows and class pairs (the runtime's time includes its bounds engine)",
        "frames_vectorized": n_vectorized, "frames_reference": n_reference, "repeats_vectorized": repeats,
        "ms_per_frame": ms,
        "speedup": _ratio(ms["reference"], ms["vectorized_one_frame_per_call"]),
        "speedup_batched": _ratio(ms["reference"], ms["vectorized_batched"]),
        "identical_certificates": True, "margin_rtol": 1e-3, "frames_compared": n_reference,
        "certified_among_compared": int(sum(c.certified for c in fast[:n_reference])),
    }


# defense kind -> its math-vs-reference function
MATH: dict[str, Callable] = {"bagcert": bagcert_math, "masking": masking_math, "cropping": cropping_math,
                             "scalecert": scalecert_math, "ibp": ibp_math}


def expansion(certifier, frames: np.ndarray, n: int, repeats: int = 3) -> dict | None:
    """Defenses that turn a frame into many engine inputs (crops; DRS ablations): the time to build them against
    the engine's time on them, per frame. ``Verdict.timings_ms`` counts that building as engine time, because it
    happens inside ``run_engine``; this separates it. None for defenses with one engine input per frame."""
    from certinfer.runtime import ablation
    from certinfer.runtime.defenses import cropping

    x = certifier.prepare(take(frames, n))
    if certifier.manifest["defense"]["kind"] == "cropping":
        certifier.fix_seed(0)
        flat = certifier.draw(len(x))
        what, build = "crops (one gather)", lambda: cropping.cut(x, certifier.crop_hw, flat)
    elif getattr(certifier, "source", None) == "ablation":
        what, build = "ablations", lambda: ablation.batch(x, certifier.geometry)
    else:
        return None
    t_build, rows = _best_of(build, repeats)
    t_engine, _ = _best_of(lambda: certifier.engine.run(rows), 1)
    return {"inputs": what, "frames": n, "engine_inputs_per_frame": len(rows) // n,
            "build_ms_per_frame": t_build * 1e3 / n, "engine_ms_per_frame": t_engine * 1e3 / n,
            "build_over_engine": _ratio(t_build, t_engine), "backend": certifier.engine.name}


# --- the run -------------------------------------------------------------------------------------------

def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=not enabled, console=Console(stderr=True))


def _frames(hw: tuple[int, int], split, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Frames at the model input size: the dataset's first images where one is given, else random pixels."""
    if split is not None:
        return np.ascontiguousarray(split.x[:max(n, 1)]), f"{split.name} (first {min(n, len(split.y))} images)"
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(max(n, 1), hw[0], hw[1], 3), dtype=np.uint8),
            "random uint8 frames at the model input size")


def _is_default(path: Path) -> bool:
    import certinfer

    try:
        return path.resolve() == Path(certinfer.default_bundle()).resolve()
    except FileNotFoundError:
        return False


def _targets(kind: str, backends: dict, math: dict | None, default_bundle: bool) -> list[dict]:
    out = []
    for name, b in backends.items():
        if "skipped" in b:
            continue
        if kind in ("bagcert", "masking"):
            over = b["best_batch"]["certify_over_engine"]
            out.append({"target": "certification overhead <= 5% of engine time (best batch)", "backend": name,
                        "value": over, "met": over is not None and over <= TARGET_OVERHEAD})
            over1 = b["batch1"]["certify_over_engine"]
            out.append({"target": "certification overhead <= 5% of engine time (batch 1, p50)", "backend": name,
                        "value": over1, "met": over1 is not None and over1 <= TARGET_OVERHEAD})
        if b.get("expansion"):
            e = b["expansion"]
            out.append({"target": f"{e['inputs']} preparation <= 10% of engine time", "backend": name,
                        "value": e["build_over_engine"],
                        "met": e["build_over_engine"] is not None and e["build_over_engine"] <= TARGET_PREP})
        if default_bundle and not b["engine"].startswith(("torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt",
                                                          "tensorrt")):
            fps = b["best_batch"]["frames_per_second"]
            out.append({"target": ">= 200 certified frames/s at the best batch (default bundle, CPU)", "backend": name,
                        "value": fps, "met": fps >= TARGET_FPS})
            p99 = b["batch1"]["stages_ms"]["total"]["p99"]
            out.append({"target": "p99 < 20 ms at batch 1 (default bundle, CPU)", "backend": name, "value": p99,
                        "met": p99 < TARGET_P99_MS})
    if math and math.get("speedup") is not None:
        out.append({"target": "vectorized certification >= 100x faster than the plain reference (one frame per call)",
                    "backend": math["maps_from_backend"], "value": math["speedup"],
                    "met": math["speedup"] >= TARGET_SPEEDUP})
    return out


def run_latency(bundle: Path | None = None, backends: tuple[str, ...] | list[str] = DEFAULT_BACKENDS,
                frames: int = 200, batches: tuple[int, ...] | list[int] = DEFAULT_BATCHES, seconds: float = 2.0,
                threat: str | None = None, threads: int | None = None, vectorized_frames: int = 300,
                reference_frames: int = 5, data: str | None = None, limit: int | None = None,
                data_batch: int | None = None, warmup: int = 5, progress: bool = True, note: str = "",
                data_backend: str | None = None) -> dict:
    """Every measurement of this module for one bundle; returns the JSON-ready result. ``note``: the conditions
    of the run (e.g. other jobs on the CPU), recorded as ``conditions`` next to the load average.
    ``data_backend``: the one backend that certifies ``data`` (default: every backend)."""
    import certinfer
    from certinfer.runtime.bundle import load_bundle
    from certinfer.runtime.engines import BACKENDS, EngineError

    path = Path(certinfer.default_bundle() if bundle is None else bundle)
    default = _is_default(path)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS[1:])}")
    if not batches or min(batches) < 1:
        raise ValueError("batch sizes must be positive integers, e.g. 1,8,32")
    manifest = load_bundle(path).manifest
    kind = manifest["defense"]["kind"]
    info = machine_info()
    result = {
        "benchmark": "latency", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info, "versions": versions(), "commit": git_commit(),
        "bundle": {"path": str(path), "default": default, "defense": manifest["defense"],
                   "threat": threat or manifest["threat"], "input_hw": manifest["input"]["hw"],
                   "classes": len(manifest["input"]["classes"]), "geometry": manifest.get("geometry"),
                   "engines": [{k: e.get(k) for k in ("file", "format", "precision", "batch", "sha256")}
                               for e in manifest["engines"]],
                   "commit": manifest.get("provenance", {}).get("commit")},
        "settings": {"frames": frames, "batches": list(batches), "seconds_per_batch": seconds, "warmup": warmup,
                     "threads": threads, "vectorized_frames": vectorized_frames, "reference_frames": reference_frames,
                     "data": data, "limit": limit, "data_backend": data_backend,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "note": GPU_NOTE if info["gpus"] else CPU_NOTE, "conditions": note,
        "load_average": {"start": list(os.getloadavg())},  # 1, 5 and 15 minutes: other work on the machine
        "backends": {}, "math_vs_reference": None, "dataset": {},
    }
    hw = (int(manifest["input"]["hw"][0]), int(manifest["input"]["hw"][1]))
    split = load_split(data, hw) if data else None
    src_frames, frames_note = _frames(hw, split, max(frames, max(batches), vectorized_frames))
    bar = _progress(progress)
    with bar:
        for name in backends:
            try:
                certifier = load_certifier(path, name, threat, threads)
            except (EngineError, ImportError) as e:
                result["backends"][name] = {"skipped": " ".join(str(e).split()) or type(e).__name__}
                continue
            task = bar.add_task(f"{name}: batch 1", total=frames)
            b1 = stream_latency(certifier, src_frames, frames, warmup, lambda k: bar.advance(task, k))
            bar.remove_task(task)
            task = bar.add_task(f"{name}: batches", total=len(batches))
            points = []
            for b in batches:
                points.append(batch_throughput(certifier, src_frames, b, seconds))
                bar.advance(task, 1)
            bar.remove_task(task)
            best = max(points, key=lambda p: p["frames_per_second"])
            entry = {"engine": certifier.engine.name, "engine_max_batch": certifier.engine.max_batch,
                     "frames": frames_note, "batch1": b1, "batches": points, "best_batch": best,
                     "expansion": expansion(certifier, src_frames, min(32, vectorized_frames)),
                     "peak_rss_mib": peak_rss_mib()}
            if split is not None and data_backend in (None, name):
                def bar_for(total, name=name):
                    t = bar.add_task(f"{name}: {data}", total=total)
                    return lambda k: bar.advance(t, k)

                entry["dataset"] = dataset_throughput(certifier, split, limit, data_batch or best["batch"], bar_for)
                entry["peak_rss_mib"] = peak_rss_mib()
            result["backends"][name] = entry
            if result["math_vs_reference"] is None and kind in MATH:
                task = bar.add_task(f"{kind} math vs reference", total=min(reference_frames, vectorized_frames))
                result["math_vs_reference"] = MATH[kind](certifier, src_frames, vectorized_frames, reference_frames,
                                                         lambda k: bar.advance(task, k))
                bar.remove_task(task)
            del certifier
    measured = {k: v for k, v in result["backends"].items() if "skipped" not in v}
    if not measured:
        reasons = "; ".join(f"{k}: {v['skipped']}" for k, v in result["backends"].items())
        raise ValueError(f"no backend could be loaded for {path}: {reasons}")
    if kind not in MATH:
        result["math_vs_reference"] = {"skipped": f"no plain reference for defense {kind!r} yet"}
    result["dataset"] = {k: v["dataset"] for k, v in measured.items() if "dataset" in v}
    result["load_average"]["end"] = list(os.getloadavg())
    result["targets"] = _targets(kind, result["backends"], result["math_vs_reference"]
                                 if "skipped" not in (result["math_vs_reference"] or {}) else None, default)
    result["peak_rss_mib"] = peak_rss_mib()
    return result


# --- output --------------------------------------------------------------------------------------------

def summary_lines(result: dict) -> list[str]:
    lines = [f"{result['bundle']['defense']['kind']} bundle {result['bundle']['path']} on {result['machine']['cpu']}"
             f" ({result['machine']['cores']} cores" + (f", {result['machine']['gpus'][0]['name']}"
                                                         if result["machine"]["gpus"] else "") + ")"]
    for name, b in result["backends"].items():
        if "skipped" in b:
            lines.append(f"  {name:22s} skipped: {b['skipped']}")
            continue
        st, best = b["batch1"]["stages_ms"], b["best_batch"]
        over1 = b["batch1"]["certify_over_engine"]
        lines.append(f"  {b['engine']:22s} batch 1: p50 {st['total']['p50']:.3f} ms  p90 {st['total']['p90']:.3f}  "
                     f"p99 {st['total']['p99']:.3f}  (prepare {st['prepare']['p50']:.3f} / engine "
                     f"{st['engine']['p50']:.3f} / certify {st['certify']['p50']:.3f})"
                     + (f"  certify/engine {over1:.1%}" if over1 is not None else ""))
        over = best["certify_over_engine"]
        lines.append(f"  {'':22s} best batch {best['batch']}: {best['frames_per_second']:.0f} frames/s"
                     + (f"  certify/engine {over:.1%}" if over is not None else "")
                     + f"  peak RSS {b['peak_rss_mib']:.0f} MiB")
        if b.get("expansion"):
            e = b["expansion"]
            lines.append(f"  {'':22s} {e['inputs']}: {e['engine_inputs_per_frame']} engine inputs per frame, built in "
                         f"{e['build_ms_per_frame']:.3f} ms/frame vs engine {e['engine_ms_per_frame']:.3f} ms/frame "
                         f"({e['build_over_engine']:.1%})")
        if "dataset" in b:
            d = b["dataset"]
            lines.append(f"  {'':22s} {d['data']} ({d['n']} images, batch {d['batch']}): {d['images_per_second']:.0f} "
                         f"images/s, clean {d['clean_accuracy']:.3f}, certified {d['certified_accuracy']:.3f}")
    m = result.get("math_vs_reference")
    if m and "skipped" not in m:
        ms = m["ms_per_frame"]
        lines.append(f"  math ({m['threat']}): reference {ms['reference']:.2f} ms/frame, vectorized "
                     f"{ms['vectorized_one_frame_per_call']:.4f} ms/frame one by one ({m['speedup']:.0f}x), "
                     f"{ms['vectorized_batched']:.4f} batched ({m['speedup_batched']:.0f}x); certificates identical "
                     f"on {m['frames_compared']} frames")
    for t in result.get("targets", []):
        value = t["value"]
        shown = "n/a" if value is None else (f"{value:.1%}" if "%" in t["target"] else f"{value:.1f}")
        lines.append(f"  target {'met' if t['met'] else 'MISSED':6s} {t['target']} [{t['backend']}]: {shown}")
    return lines


def defense_label(result: dict) -> str:
    """``bagcert``, ``masking mask-ds``, ``cropping sample`` ...: the defense kind and its variant or mode."""
    d = result["bundle"]["defense"]
    extra = d.get("params", {}).get("variant") or d.get("params", {}).get("mode")
    return f"{d['kind']} {extra}" if extra else d["kind"]


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def markdown_table(results: list[dict]) -> str:
    """One row per measured backend of each result: the table the README shows (with the machine of each row)."""
    rows = ["| bundle | defense | machine | backend | p50 / p99 ms (batch 1) | prepare / engine / certify ms (batch 1 "
            "p50) | certify / engine (batch 1 / best) | best batch: frames/s | crops or ablations built / engine "
            "| peak RSS MiB | math speed-up (1 frame / batched) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.get("math_vs_reference") or {}
        speed = (f"{m['speedup']:.0f}x / {m['speedup_batched']:.0f}x" if m.get("speedup") else "n/a")
        machine = r["machine"]["gpus"][0]["name"] if r["machine"]["gpus"] else f"{r['machine']['cpu']} ({r['machine']['cores']} cores)"
        for b in r["backends"].values():
            if "skipped" in b:
                continue
            st, best = b["batch1"]["stages_ms"], b["best_batch"]
            split = " / ".join(f"{st[k]['p50']:.2f}" for k in ("prepare", "engine", "certify"))
            over = f"{_pct(b['batch1']['certify_over_engine'])} / {_pct(best['certify_over_engine'])}"
            built = _pct(b["expansion"]["build_over_engine"]) if b.get("expansion") else "none"
            rows.append(f"| {Path(r['bundle']['path']).name} | {defense_label(r)} | {machine} | {b['engine']} "
                        f"| {st['total']['p50']:.2f} / {st['total']['p99']:.2f} | {split} | {over} "
                        f"| {best['frames_per_second']:.0f} (batch {best['batch']}) | {built} "
                        f"| {b['peak_rss_mib']:.0f} | {speed} |")
    return "\n".join(rows)


def plot_result(result: dict, path: Path) -> Path:
    """Latency split by stage per backend (batch 1 p50 and best batch), and vectorized vs reference (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {k: v for k, v in result["backends"].items() if "skipped" not in v}
    math = result.get("math_vs_reference")
    has_math = bool(math) and "skipped" not in math
    fig, axes = plt.subplots(1, 2 if has_math else 1, figsize=(12 if has_math else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    labels, rows = [], []
    for name, b in measured.items():
        st = b["batch1"]["stages_ms"]
        labels.append(f"{b['engine']}\nbatch 1 (p50)")
        rows.append([st[s]["p50"] for s in ("prepare", "engine", "certify")])
        best = b["best_batch"]
        labels.append(f"{b['engine']}\nbatch {best['batch']} (per frame)")
        rows.append([best["per_frame_ms"][s] for s in ("prepare", "engine", "certify")])
    rows_a = np.asarray(rows, dtype=float).reshape(-1, 3)
    bottom = np.zeros(len(rows_a))
    for k, (stage, color) in enumerate(zip(("prepare", "engine", "certify"), ("#8da0cb", "#66c2a5", "#fc8d62"))):
        ax.bar(range(len(rows_a)), rows_a[:, k], bottom=bottom, label=stage, color=color)
        bottom += rows_a[:, k]
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("ms per frame")
    ax.set_title(f"{defense_label(result)}: latency by stage")
    ax.legend()
    if has_math:
        ax = axes[0, 1]
        ms = math["ms_per_frame"]
        names = ["reference\n(paper loops)", "vectorized\none frame per call", "vectorized\nbatched"]
        values = [ms["reference"], ms["vectorized_one_frame_per_call"], ms["vectorized_batched"]]
        ax.bar(range(3), values, color=["#999999", "#fc8d62", "#e78ac3"])
        ax.set_yscale("log")
        ax.set_xticks(range(3), names, fontsize=8)
        ax.set_ylabel("ms per frame (log scale)")
        ax.set_title(f"certification math, threat {math['threat']}: {math['speedup']:.0f}x / {math['speedup_batched']:.0f}x")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g} ms", ha="center", va="bottom", fontsize=8)
    machine = result["machine"]
    fig.suptitle(f"{machine['cpu']}, {machine['cores']} cores" + (f", {machine['gpus'][0]['name']}"
                                                                  if machine["gpus"] else " (no GPU)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_result(result: dict, out_dir: Path, name: str, machine: str | None = None, plot: bool = True) -> dict:
    """Write ``<out_dir>/<name>-<machine>.json`` (and ``.png``); returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{machine or machine_slug(result['machine'])}"
    paths = {"json": out_dir / f"{stem}.json"}
    if plot:
        paths["png"] = plot_result(result, out_dir / f"{stem}.png")
    result["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return paths


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: use comma-separated batch sizes, e.g. 1,8,32", param_hint="--batches")
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{text!r}: batch sizes must be positive", param_hint="--batches")
    return values


cli = typer.Typer(add_completion=False)


@cli.command("latency")
def latency_command(
    bundle: Optional[Path] = typer.Argument(None, help="Bundle folder or .tar [default: the packaged bundle]"),
    backend: list[str] = typer.Option(
        [], "--backend", "-b", help="Backend to measure (repeatable) [default: every backend; unavailable ones are "
                                    "recorded as skipped]"),
    frames: int = typer.Option(200, min=1, help="Frames for the batch-1 streaming latency"),
    batches: str = typer.Option(",".join(map(str, DEFAULT_BATCHES)), help="Batch sizes for throughput"),
    seconds: float = typer.Option(2.0, min=0.0, help="Time spent per throughput batch size (at least 2 calls)"),
    threat: Optional[str] = typer.Option(None, help="Threat spec [default: the bundle's]"),
    threads: Optional[int] = typer.Option(None, min=1, help="Engine CPU threads (onnxruntime, torch)"),
    vectorized_frames: int = typer.Option(300, min=1, help="Frames for timing the vectorized certification math"),
    reference_frames: int = typer.Option(5, min=1, help="Frames for timing the plain reference (slow)"),
    data: Optional[str] = typer.Option(None, help="Dataset split for certification throughput (and as frames), "
                                                  "e.g. gtsrb:test, cifar10:test, folder:PATH"),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N images of --data"),
    data_batch: Optional[int] = typer.Option(None, min=1, help="Batch for --data [default: the best batch]"),
    out_dir: Path = typer.Option(Path("bench/results"), help="Folder for the JSON and the plot"),
    name: Optional[str] = typer.Option(None, help="File name stem [default: latency-DEFENSE-BUNDLE]"),
    machine: Optional[str] = typer.Option(None, help="Machine tag in the file name [default: GPU or CPU model]"),
    plot: bool = typer.Option(True, help="Write the plot"),
    data_backend: Optional[str] = typer.Option(None, help="Certify --data on this backend only [default: every one]"),
    note: str = typer.Option("", help="Conditions of the run to record, e.g. 'CPU shared with 4 training jobs'"),
) -> None:
    """Latency and throughput per backend, certification math vs the plain reference, dataset throughput."""
    result = run_latency(bundle, tuple(backend) or DEFAULT_BACKENDS, frames, _batches(batches), seconds, threat,
                         threads, vectorized_frames, reference_frames, data, limit, data_batch, note=note,
                         data_backend=data_backend)
    label = "default" if bundle is None else bundle.name.removesuffix(".tar")
    paths = write_result(result, out_dir, name or f"latency-{result['bundle']['defense']['kind']}-{label}", machine,
                         plot)
    sys.stderr.write("\n".join(summary_lines(result)) + "\n")
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))
