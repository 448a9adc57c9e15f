"""Soak: stream many frames through one bundle; memory must stay flat and every frame must get a verdict.

    certinfer bench soak [--bundle B] [--frames 100000] [--bad-every 100] [--cameras 1] [--out FILE]

Frames are in-memory arrays cycling over the packaged sample frames (or random frames), with an invalid
frame (NaN floats, 16-bit, grayscale, RGBA, empty, wrong rank, not an array, an unreadable file) every
``bad_every`` frames, so the expected fail-safe count is known exactly. Each camera is one thread running
:func:`run_stream` on one shared Certifier. The report (JSON, default ``bench/results/soak-<machine>.json``)
holds RSS at start, after warm-up, at checkpoints and at the end; frames in and verdicts out; statuses and
fail-safe reasons; frames/s; and ``ok``: every frame answered, exactly the bad frames fail-safe, RSS flat.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from certinfer.bench.bundles import load_certifier, packaged
from certinfer.bench.machine import machine_info, machine_slug, peak_rss_mib, rss_mib, slug

FLAT_MB = 32.0  # RSS growth after warm-up tolerated as allocator noise (onnxruntime arenas, numpy caches)
CHECKPOINTS = 10


def machine() -> tuple[dict, str]:
    """This machine's description and file-name tag, as the latency bench names them (GPU, else CPU and cores)."""
    info = machine_info()
    return info, machine_slug(info)


# --- frames -------------------------------------------------------------------------------------------

def bad_frames(hw: tuple[int, int]) -> list[tuple[str, object]]:
    """One of each kind of invalid frame; all must come back fail-safe."""
    from certinfer.runtime.stream import UnreadableFrame

    h, w = hw
    nan = np.zeros((h, w, 3), np.float32)
    nan[0, 0, 0] = np.nan
    return [("nan", nan), ("uint16", np.zeros((h, w, 3), np.uint16)), ("gray", np.zeros((h, w), np.uint8)),
            ("rgba", np.zeros((h, w, 4), np.uint8)), ("empty", np.zeros((0, w, 3), np.uint8)),
            ("rank5", np.zeros((1, 1, h, w, 3), np.uint8)), ("not-an-array", "frame.png"),
            ("unreadable", UnreadableFrame("soak.png: image file is truncated"))]


def good_frames(source: str, hw: tuple[int, int], seed: int = 0) -> tuple[list[np.ndarray], str]:
    """The packaged sample frames (when this install has them and source is ``samples``), else random ones."""
    if source == "samples":
        from certinfer.runtime.stream import folder

        try:
            frames = [f for _, f in folder(packaged("samples")) if isinstance(f, np.ndarray)]
            if frames:
                return frames, "samples"
        except FileNotFoundError:
            pass
    elif source != "random":
        raise ValueError(f"frame source must be 'samples' or 'random', got {source!r}")
    rng = np.random.default_rng(seed)
    sizes = [hw, (hw[0] * 2, hw[1] * 2), (hw[0] + 7, hw[1] + 3)]  # the input size and two that need resizing
    return [rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8) for i in range(48)], "random"


def frame_stream(n: int, good: list[np.ndarray], bad: list[tuple[str, object]], bad_every: int,
                 start: int = 0) -> Iterator[tuple[str, object]]:
    """``n`` frames ``(id, frame)``; frame i (counted from ``start``) is bad when ``(i + 1) % bad_every == 0``."""
    g = 0
    for i in range(start, start + n):
        if bad_every and (i + 1) % bad_every == 0:
            kind, frame = bad[(i // bad_every) % len(bad)]  # by global index: cameras share the cycle of kinds
            yield f"bad-{kind}-{i}", frame
        else:
            yield f"good-{i}", good[g % len(good)]
            g += 1


def expected_bad(n: int, bad_every: int, start: int = 0) -> int:
    return 0 if not bad_every else (start + n) // bad_every - start // bad_every


# --- the soak -----------------------------------------------------------------------------------------

def soak(bundle=None, frames: int = 100_000, bad_every: int = 100, batch: int = 1, cameras: int = 1,
         source: str = "samples", backend: str = "auto", threads: int | None = 1, deadline_ms: float | None = None,
         checkpoints: int = CHECKPOINTS, progress=None) -> dict:
    """Run the soak and return its report (see the module docstring)."""
    from certinfer.runtime.stream import FrameSource, StreamSummary, run_stream

    if frames < 1 or cameras < 1 or batch < 1 or bad_every < 0:
        raise ValueError("frames, cameras and batch must be >= 1 and bad_every >= 0")
    rss_start = rss_mib()
    certifier = load_certifier(bundle, backend, threads=threads)
    good, good_source = good_frames(source, certifier.input_hw)
    bad = bad_frames(certifier.input_hw)
    for _ in range(3):  # warm-up: engine arenas, first-call allocations
        certifier(np.stack([good[0]] * batch))
    rss_warm = rss_mib()

    per_camera = [frames // cameras + (1 if c < frames % cameras else 0) for c in range(cameras)]
    starts = [sum(per_camera[:c]) for c in range(cameras)]
    summaries = [StreamSummary() for _ in range(cameras)]
    mismatches = [Counter() for _ in range(cameras)]  # a good frame fail-safe, a bad frame answered, wrong order
    done = [0] * cameras
    samples: list[dict] = []
    step = max(1, frames // max(1, checkpoints))
    next_mark = [step]
    lock = threading.Lock()
    errors: list[BaseException] = []
    t0 = time.perf_counter()

    def mark(force: bool = False) -> None:
        with lock:
            total = sum(done)
            if force or total >= next_mark[0]:
                while next_mark[0] <= total:
                    next_mark[0] += step
                elapsed = time.perf_counter() - t0
                samples.append({"frames": total, "seconds": round(elapsed, 3), "rss_mb": round(rss_mib(), 1)})
                if progress is not None:
                    progress(f"soak: {total}/{frames} frames, {total / max(elapsed, 1e-9):.0f} frames/s, "
                             f"rss {samples[-1]['rss_mb']:.1f} MB")

    def camera(c: int) -> None:
        try:
            items = FrameSource(frame_stream(per_camera[c], good, bad, bad_every, starts[c]), f"camera{c}")
            ids = (f"good-{i}" if not (bad_every and (i + 1) % bad_every == 0) else None
                   for i in range(starts[c], starts[c] + per_camera[c]))
            for verdict, expected_id in zip(run_stream(certifier, items, deadline_ms=deadline_ms, batch=batch,
                                                       summary=summaries[c]), ids):
                is_bad = verdict.frame.startswith("bad-")
                if expected_id is not None and verdict.frame != expected_id or expected_id is None and not is_bad:
                    mismatches[c]["out of order"] += 1
                elif is_bad and verdict.status != "fail-safe":
                    mismatches[c]["bad frame answered"] += 1
                elif not is_bad and verdict.status == "fail-safe":
                    mismatches[c]["good frame fail-safe: " + verdict.reason.split(":", 1)[0]] += 1
                done[c] += 1
                if done[c] % 64 == 0:
                    mark()
        except BaseException as e:  # reported, never silently lost
            errors.append(e)

    workers = [threading.Thread(target=camera, args=(c,), name=f"camera{c}") for c in range(cameras)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    mark(force=True)
    if errors:
        raise errors[0]

    total = StreamSummary()
    for s in summaries:
        total.frames_in += s.frames_in
        total.statuses.update(s.statuses)
        total.reasons.update(s.reasons)
    n_bad = sum(expected_bad(per_camera[c], bad_every, starts[c]) for c in range(cameras))
    problems = sum((m for m in mismatches), Counter())
    rss_end = rss_mib()
    growth = rss_end - rss_warm
    info, tag = machine()
    report = {
        "bench": "soak",
        "machine": tag,
        "machine_info": info,
        "python": platform.python_version(),
        "bundle": str(bundle) if bundle is not None else "default",
        "defense": certifier.manifest["defense"]["kind"],
        "backend": certifier.engine.name,
        "threat": str(certifier.threat),
        "frames": frames, "batch": batch, "cameras": cameras, "engine_threads": threads,
        "deadline_ms": deadline_ms, "frame_source": good_source, "bad_every": bad_every,
        "frames_in": total.frames_in, "verdicts_out": total.verdicts_out,
        "statuses": dict(total.statuses), "fail_safe_reasons": dict(total.reasons),
        "bad_frames": n_bad, "fail_safe": total.statuses.get("fail-safe", 0),
        "mismatches": dict(problems),
        "seconds": round(elapsed, 3), "frames_per_s": round(frames / elapsed, 1),
        "rss_mb": {"start": round(rss_start, 1), "after_warmup": round(rss_warm, 1), "end": round(rss_end, 1),
                   "peak": round(max(peak_rss_mib(), rss_end, *(c["rss_mb"] for c in samples)), 1),
                   "growth_after_warmup": round(growth, 1),
                   "flat_tolerance": FLAT_MB, "checkpoints": samples},
        "summary": str(total),
    }
    report["ok"] = bool(total.frames_in == total.verdicts_out == frames and report["fail_safe"] == n_bad
                        and not problems and growth <= FLAT_MB)
    return report


cli = typer.Typer(add_completion=False)


@cli.command("soak")
def soak_command(
    bundle: Optional[Path] = typer.Option(None, "--bundle", "-b",
                                          help="Bundle folder or .tar [default: the packaged one]"),
    frames: int = typer.Option(100_000, min=1, help="Frames to stream"),
    bad_every: int = typer.Option(100, min=0, help="Every Nth frame is invalid (0: none)"),
    batch: int = typer.Option(1, min=1, help="Frames per engine call"),
    cameras: int = typer.Option(1, min=1, help="Threads streaming at once through one shared Certifier"),
    source: str = typer.Option("samples", help="Good frames: samples (the packaged ones) or random"),
    backend: str = typer.Option("auto", help="Engine backend"),
    threads: int = typer.Option(1, min=0, help="Engine intra-op threads (onnxruntime; 0: its default)"),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="Per-frame deadline"),
    machine: Optional[str] = typer.Option(None, help="Machine name in the result file [default: CPU model]"),
    out: Optional[Path] = typer.Option(None, help="Result JSON [default: bench/results/soak-<machine>.json]"),
) -> None:
    """Stream many frames through one bundle: RSS over time, frames in == verdicts out, fail-safe counts."""
    report = soak(bundle, frames=frames, bad_every=bad_every, batch=batch, cameras=cameras, source=source,
                  backend=backend, threads=threads or None, deadline_ms=deadline_ms,
                  progress=lambda line: typer.echo(line, err=True))
    if machine:
        report["machine"] = machine
    path = out or Path("bench") / "results" / f"soak-{slug(report['machine'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    rss = report["rss_mb"]
    typer.echo(f"soak: {report['summary']}; {report['frames_per_s']} frames/s; rss {rss['start']} -> "
               f"{rss['after_warmup']} (warm) -> {rss['end']} MB (growth {rss['growth_after_warmup']} MB); "
               f"{'ok' if report['ok'] else 'NOT OK'}; wrote {path}")
    if not report["ok"]:
        raise typer.Exit(1)
