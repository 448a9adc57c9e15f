"""``certinfer bench latency``: how fast a bundle certifies, per backend, and how fast its certification math is.

For a bundle and each backend that loads here (onnxruntime CPU/CUDA/TensorRT, native TensorRT, torch CPU/CUDA
where the bundle has a torch entry; the others are recorded as skipped with the reason):

* streaming latency at batch 1: p50/p90/p99 over N frames of each stage (prepare / engine / certify / total,
  from ``Verdict.timings_ms``; engine is time inside the engine only) and of the wall time of the whole call;
* throughput at several batch sizes and the best of them, with the per-frame stage split;
* certification overhead as a share of engine time (batch 1 and best batch), and the process's peak RSS;
* for defenses that turn a frame into many engine inputs (crops, ablations, occlusions, IBP's patch boxes), the
  time to build them against the engine's time on them (:mod:`certinfer.bench.measure`);
* dataset certification throughput (images/s through :func:`certinfer.runtime.evaluate.evaluate_certifier`)
  on a dataset split, when one is given.

Once per bundle, on the first backend measured: the vectorized certification math against the defense's plain
reference (:func:`certinfer.bench.reference.math_vs_reference`); a mismatch fails the benchmark.

Results go to a JSON file (machine, versions, git commit, date) and a ``.png`` plot beside it. Nothing here
imports torch unless a torch backend is asked for and the bundle has a torch engine.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from certinfer.bench.bundles import load_certifier, packaged, resolve
from certinfer.bench.machine import machine_info, machine_slug, peak_rss_mib, versions
from certinfer.bench.measure import batch_throughput, dataset_throughput, expansion, stream_latency, take
from certinfer.bench.plots import plot_result, summary_lines
from certinfer.bench.reference import math_vs_reference
from certinfer.provenance import git_commit
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.certifier import Certifier
from certinfer.runtime.defenses import DefenseError, defense
from certinfer.runtime.engines import BACKENDS, EngineError

DEFAULT_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "torch-cpu",
                    "torch-cuda", "torch-cuda-graphs")
DEFAULT_BATCHES = (1, 8, 32, 128, 512)
TARGET_OVERHEAD = 0.05  # certification at most 5% of the engine's time ...
OVERHEAD_DEFENSES = ("bagcert", "masking")  # ... for the defenses whose certification is a pass over one map
TARGET_PREP = 0.10  # building a frame's many engine inputs at most 10% of the engine's time on them
TARGET_SPEEDUP = 100.0  # vectorized certifiers at least 100x faster than the plain references
TARGET_FPS = 200.0  # default bundle on the CPU: at least 200 certified frames/s at the best batch ...
TARGET_P99_MS = 20.0  # ... and p99 below 20 ms at batch 1
GPU_BACKENDS = ("torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")

CPU_NOTE = ("Measured on a CPU-only machine: the ratios (certification overhead as a share of engine time, "
            "vectorized vs reference speed-up) are meaningful here; absolute times depend on this CPU and its load "
            "and say nothing about GPU latency, which only a GPU machine can measure.")
GPU_NOTE = ("Measured on a GPU machine: absolute engine times are this GPU's; certification and preparation run "
            "on the host CPU.")


@dataclass(frozen=True)
class LatencyOptions:
    """What to measure: ``backends``; batch-1 ``frames`` after ``warmup``; throughput at ``batches`` for
    ``seconds`` each; the math on ``vectorized_frames`` against the reference on ``reference_frames``; with
    ``data`` (under ``data_dir``, default: the data root), certification of its first ``limit`` images (at the best
    batch) on ``data_backend`` (default: every backend); ``threads`` caps the engine's CPU threads; ``note`` records
    the conditions of the run (e.g. other jobs on the CPU)."""

    backends: tuple[str, ...] = DEFAULT_BACKENDS
    frames: int = 200
    warmup: int = 5
    batches: tuple[int, ...] = DEFAULT_BATCHES
    seconds: float = 2.0
    threat: str | None = None
    threads: int | None = None
    vectorized_frames: int = 300
    reference_frames: int = 5
    data: str | None = None
    limit: int | None = None
    data_backend: str | None = None
    data_dir: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS[1:])}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError("batch sizes must be positive integers, e.g. 1,8,32")


def load_split(data: str, hw: tuple[int, int], data_dir: str | None = None):
    """A dataset split as uint8 images at the model input size (numpy + PIL only, no torch)."""
    from certinfer.train import data as datasets

    return datasets.load(data, data_dir, hw=hw)


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
    try:
        return path.resolve() == packaged("default_bundle").resolve()
    except FileNotFoundError:
        return False


def _backend_targets(kind: str, name: str, b: dict, default_bundle: bool) -> list[dict]:
    out = []
    if kind in OVERHEAD_DEFENSES:
        for what, over in (("best batch", b["best_batch"]["certify_over_engine"]),
                           ("batch 1, p50", b["batch1"]["certify_over_engine"])):
            out.append({"target": f"certification overhead <= 5% of engine time ({what})", "backend": name,
                        "value": over, "met": over is not None and over <= TARGET_OVERHEAD})
    if e := b.get("expansion"):
        out.append({"target": "engine inputs built in <= 10% of engine time", "backend": name,
                    "value": e["build_over_engine"],
                    "met": e["build_over_engine"] is not None and e["build_over_engine"] <= TARGET_PREP})
    if default_bundle and not b["engine"].startswith(GPU_BACKENDS):
        fps, p99 = b["best_batch"]["frames_per_second"], b["batch1"]["stages_ms"]["total"]["p99"]
        out += [{"target": ">= 200 certified frames/s at the best batch (default bundle, CPU)", "backend": name,
                 "value": fps, "met": fps >= TARGET_FPS},
                {"target": "p99 < 20 ms at batch 1 (default bundle, CPU)", "backend": name, "value": p99,
                 "met": p99 < TARGET_P99_MS}]
    return out


def targets(kind: str, backends: dict, math: dict | None, default_bundle: bool) -> list[dict]:
    """Where the targets stand for each measured backend, and for the math against its reference."""
    out = [t for name, b in backends.items() if "skipped" not in b
           for t in _backend_targets(kind, name, b, default_bundle)]
    if math and math.get("speedup") is not None:
        out.append({"target": "vectorized certification >= 100x faster than the plain reference (one frame per call)",
                    "backend": math["maps_from_backend"], "value": math["speedup"],
                    "met": math["speedup"] >= TARGET_SPEEDUP})
    return out


def _header(path: Path, manifest: dict, options: LatencyOptions) -> dict:
    info = machine_info()
    return {
        "benchmark": "latency", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": info, "versions": versions(), "commit": git_commit(),
        "bundle": {"path": str(path), "default": _is_default(path), "defense": manifest["defense"],
                   "threat": options.threat or manifest["threat"], "input_hw": manifest["input"]["hw"],
                   "classes": len(manifest["input"]["classes"]), "geometry": manifest.get("geometry"),
                   "engines": [{k: e.get(k) for k in ("file", "format", "precision", "batch", "sha256")}
                               for e in manifest["engines"]],
                   "commit": manifest.get("provenance", {}).get("commit")},
        "settings": {**dataclasses.asdict(options), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "note": GPU_NOTE if info["gpus"] else CPU_NOTE, "conditions": options.note,
        "load_average": {"start": list(os.getloadavg())},  # 1, 5 and 15 minutes: other work on the machine
        "backends": {}, "math_vs_reference": None, "dataset": {},
    }


class _Run:
    """One ``run_latency``: its options, frames and dataset, and the progress bar every measurement advances."""

    def __init__(self, manifest: dict, options: LatencyOptions, bar):
        self.kind, self.options, self.bar = manifest["defense"]["kind"], options, bar
        hw = tuple(int(v) for v in manifest["input"]["hw"])
        self.split = load_split(options.data, hw, options.data_dir) if options.data else None
        o = options
        self.frames, self.frames_note = _frames(hw, self.split, max(o.frames, max(o.batches), o.vectorized_frames))

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar line while the block runs; yields its ``advance(k)``."""
        task = self.bar.add_task(description, total=total)
        try:
            yield lambda k: self.bar.advance(task, k)
        finally:
            self.bar.remove_task(task)

    def backend(self, certifier: Certifier) -> dict:
        """Every per-backend measurement of one loaded certifier."""
        o, name = self.options, certifier.engine.name
        with self.task(f"{name}: batch 1", o.frames) as advance:
            b1 = stream_latency(certifier, self.frames, o.frames, o.warmup, advance)
        points = []
        with self.task(f"{name}: batches", len(o.batches)) as advance:
            for b in o.batches:
                points.append(batch_throughput(certifier, self.frames, b, o.seconds))
                advance(1)
        best = max(points, key=lambda p: p["frames_per_second"])
        return {"engine": name, "engine_max_batch": certifier.engine.max_batch, "frames": self.frames_note,
                "batch1": b1, "batches": points, "best_batch": best,
                "expansion": expansion(certifier, take(self.frames, min(32, o.vectorized_frames))),
                "peak_rss_mib": round(peak_rss_mib(), 1)}

    def dataset(self, certifier: Certifier, batch: int) -> dict:
        limit, n = self.options.limit, len(self.split.y)
        with self.task(f"{certifier.engine.name}: {self.options.data}", min(limit or n, n)) as advance:
            return dataset_throughput(certifier, self.split, limit, batch, advance)

    def math(self, certifier: Certifier) -> dict:
        try:
            reference = defense(self.kind).load("reference")
        except DefenseError as e:
            return {"skipped": str(e)}
        o = self.options
        with self.task(f"{self.kind} math vs reference", min(o.reference_frames, o.vectorized_frames)) as advance:
            return math_vs_reference(certifier, take(self.frames, o.vectorized_frames), reference,
                                     o.reference_frames, progress=advance)


def run_latency(bundle: Path | None = None, options: LatencyOptions = LatencyOptions(), progress: bool = True) -> dict:
    """Every measurement of this module for one bundle (None: the packaged default); the JSON-ready result."""
    path = resolve(bundle)
    manifest = load_bundle(path).manifest
    result = _header(path, manifest, options)
    with _progress(progress) as bar:
        run = _Run(manifest, options, bar)
        for name in options.backends:
            try:
                certifier = load_certifier(path, name, options.threat, options.threads)
            except (EngineError, ImportError) as e:
                result["backends"][name] = {"skipped": " ".join(str(e).split()) or type(e).__name__}
                continue
            entry = result["backends"][name] = run.backend(certifier)
            if run.split is not None and options.data_backend in (None, name):
                entry["dataset"] = run.dataset(certifier, entry["best_batch"]["batch"])
                entry["peak_rss_mib"] = round(peak_rss_mib(), 1)
            if result["math_vs_reference"] is None:
                result["math_vs_reference"] = run.math(certifier)
            del certifier
    measured = {k: v for k, v in result["backends"].items() if "skipped" not in v}
    if not measured:
        reasons = "; ".join(f"{k}: {v['skipped']}" for k, v in result["backends"].items())
        raise ValueError(f"no backend could be loaded for {path}: {reasons}")
    math = result["math_vs_reference"]
    result["dataset"] = {k: v["dataset"] for k, v in measured.items() if "dataset" in v}
    result["load_average"]["end"] = list(os.getloadavg())
    result["targets"] = targets(manifest["defense"]["kind"], result["backends"],
                                None if "skipped" in math else math, result["bundle"]["default"])
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


# --- output --------------------------------------------------------------------------------------------

def write_result(result: dict, path: Path, plot: bool = True) -> dict[str, Path]:
    """Write the result to ``path`` (JSON) and, with ``plot``, its plot beside it (``.png``); the paths written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": path}
    if plot:
        paths["png"] = plot_result(result, path.with_suffix(".png"))
    result["files"] = {k: str(v) for k, v in paths.items()}
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return paths


def default_path(result: dict, bundle: Path | None) -> Path:
    """``bench/results/latency-<defense>-<bundle folder>-<machine>.json``."""
    label = "default" if bundle is None else bundle.name.removesuffix(".tar")
    return (Path("bench/results")
            / f"latency-{result['bundle']['defense']['kind']}-{label}-{machine_slug(result['machine'])}.json")


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
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
    data_backend: Optional[str] = typer.Option(None, help="Certify --data on this backend only [default: every one]"),
    data_dir: Optional[str] = typer.Option(
        None, "--data-dir",
        help="Data folder with gtsrb/ and cifar10/ [default: $CERTINFER_DATA, else shared/data here or above]"),
    note: str = typer.Option("", help="Conditions of the run to record, e.g. 'CPU shared with 4 training jobs'"),
    out: Optional[Path] = typer.Option(
        None, help="Result JSON, the plot beside it [default: bench/results/latency-DEFENSE-BUNDLE-MACHINE.json]"),
    plot: bool = typer.Option(True, help="Write the plot"),
) -> None:
    """Latency and throughput per backend, certification math vs the plain reference, dataset throughput."""
    options = LatencyOptions(backends=tuple(backend) or DEFAULT_BACKENDS, frames=frames, batches=_batches(batches),
                             seconds=seconds, threat=threat, threads=threads, vectorized_frames=vectorized_frames,
                             reference_frames=reference_frames, data=data, limit=limit, data_backend=data_backend,
                             data_dir=data_dir, note=note)
    result = run_latency(bundle, options)
    paths = write_result(result, out or default_path(result, bundle), plot)
    sys.stderr.write("\n".join(summary_lines(result)) + "\n")
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))
