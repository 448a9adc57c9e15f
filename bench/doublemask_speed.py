"""``certinfer bench doublemask-speed``: what makes double masking fast, lever by lever, on the same frames.

Modes, each timed frame by frame (batch 1, a camera's latency) and, for the batched ones, at a batch of frames:

* ``loop``: PatchCleanser's own way, one masked copy per engine call, every pair of masks of every frame
  (:mod:`certinfer.bench.doublemask_reference`); on the first ``loop_frames`` frames only (it is slow);
* ``batched``: the runtime with every masked copy of a frame built by one vectorized operation and sent to the
  engine as one call per round, every pair of every frame (``early_exit=False``);
* ``early-exit``: the same, a frame whose first round disagrees getting only the pairs inference reads;
* ``feature``: a feature-space bundle (PatchCURE: the front part once per frame, masks on its feature map, the
  back part per copy), batched with early exit, when one is given;
* ``device-copies``: the last of those with the masked copies built on the engine's device from the frame and
  the mask indices (``device_copies``), where the engine can (torch); the modes before it build them on the host.

Certificates must be identical across modes of one model (the label and the certified flag exactly, margins
within ``MARGIN_ATOL``: batched and single-copy engine calls may round differently in the last bits); the
feature bundle's against its own per-copy loop. A mismatch fails the benchmark. Each lever's share of the total
speed-up is its share of the log of the ratio (batching x early exit x feature space x device copies = total).
Results: ``<out>/doublemask-speed-<bundle>-<machine>.json`` (``-<backend>`` added for a backend other than
onnxruntime CPU, ``-<N>threads`` with ``--threads N`` above 1)
and a ``.png`` plot.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from certinfer.bench.bundles import load_certifier
from certinfer.bench.doublemask_reference import reference_decisions
from certinfer.provenance import git_commit
from certinfer.runtime.defenses.doublemask import DoubleMaskCertifier
from certinfer.runtime.engines import DeviceMasking

MARGIN_ATOL = 1e-4
Outcome = tuple[int, bool, float]  # label, certified, margin


class BenchError(AssertionError):
    """Two modes gave different certificates."""


def _outcome(label: int, cert) -> Outcome:
    return int(label), bool(cert.certified), float(min(r.margin for r in cert.per_rect.values()))


def _timed(fn, repeats: int):
    """The fastest of ``repeats`` calls (the others are noise from whatever else runs) and its result."""
    best, result = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def loop_mode(certifier: DoubleMaskCertifier, frames: np.ndarray,
              repeats: int = 1) -> tuple[list[Outcome], np.ndarray, np.ndarray]:
    """Per-copy loop, frame by frame: outcomes, seconds and engine rows per frame."""
    outcomes, seconds = [], []
    k = len(certifier.masks)
    for frame in frames:
        s, ((label, _, cert),) = _timed(lambda: reference_decisions(certifier, frame[None]), repeats)
        seconds.append(s)
        outcomes.append(_outcome(label, cert))
    return outcomes, np.array(seconds), np.full(len(frames), k * (k + 1) // 2)


def _certify_one(certifier: DoubleMaskCertifier, frame: np.ndarray):
    """Features and the certificate math's decision (compared across modes even where the runtime would withdraw
    the certificate: a backend the bundle's export did not verify, see ``result['verified']``)."""
    features, _ = certifier.timed_features(frame[None])
    return features, certifier.decide(features, certifier.options)[0]


def runtime_mode(certifier: DoubleMaskCertifier, frames: np.ndarray,
                 repeats: int = 1) -> tuple[list[Outcome], np.ndarray, np.ndarray]:
    """The runtime, frame by frame: outcomes, seconds (prepare + engine + certify) and engine rows per frame."""
    outcomes, seconds, rows = [], [], []
    for frame in frames:
        s, (features, d) = _timed(lambda: _certify_one(certifier, frame), repeats)
        seconds.append(s)
        outcomes.append(_outcome(d.label, d.certificate))
        rows.append(int(features.rows[0]))
    return outcomes, np.array(seconds), np.array(rows)


def batch_seconds(certifier: DoubleMaskCertifier, frames: np.ndarray, batch: int) -> float:
    """Seconds per frame when certifying ``frames`` in batches of ``batch`` (one call per batch)."""
    t0 = time.perf_counter()
    for s in range(0, len(frames), batch):
        certifier(frames[s:s + batch])
    return (time.perf_counter() - t0) / len(frames)


def check_same(name: str, a: list[Outcome], b: list[Outcome]) -> float:
    """Raise :class:`BenchError` unless labels and certified flags match and margins agree; the largest margin
    difference."""
    worst = 0.0
    for i, ((la, ca, ma), (lb, cb, mb)) in enumerate(zip(a, b)):
        worst = max(worst, abs(ma - mb))
        if la != lb or ca != cb or abs(ma - mb) > MARGIN_ATOL:
            raise BenchError(f"{name}: frame {i} differs: label/certified/margin {la}/{ca}/{ma} vs {lb}/{cb}/{mb}")
    return worst


def _stats(seconds: np.ndarray, rows: np.ndarray) -> dict:
    ms = seconds * 1e3
    return {"frames": len(ms), "ms_per_frame": float(ms.mean()), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "frames_per_s": float(1e3 / ms.mean()),
            "engine_rows_per_frame": float(rows.mean())}


def speed(pixel: DoubleMaskCertifier, frames: np.ndarray, feature: DoubleMaskCertifier | None = None,
          loop_frames: int = 4, batch: int = 32, repeats: int = 3) -> dict:
    """Time every mode on ``frames`` (uint8 NHWC), check certificates across modes, and compute the levers.

    Per-frame times are the fastest of ``repeats`` runs of that frame (the per-copy loop runs once)."""
    few = frames[:loop_frames]
    loop, loop_s, loop_rows = loop_mode(pixel, few)
    batched_pixel = pixel.with_options(early_exit=False, device_copies=False)
    last = pixel.with_options(early_exit=True, device_copies=False)
    batched, batched_s, batched_rows = runtime_mode(batched_pixel, frames, repeats)
    early, early_s, early_rows = runtime_mode(last, frames, repeats)
    modes = {"loop": _stats(loop_s, loop_rows), "batched": _stats(batched_s, batched_rows),
             "early-exit": _stats(early_s, early_rows)}
    diffs = {"loop/batched": check_same("loop vs batched", loop, batched[:loop_frames]),
             "batched/early-exit": check_same("batched vs early exit", batched, early)}
    modes["batched"]["ms_per_frame_at_batch"] = batch_seconds(batched_pixel, frames, batch) * 1e3
    modes["early-exit"]["ms_per_frame_at_batch"] = batch_seconds(last, frames, batch) * 1e3
    certified = {"pixel": float(np.mean([c for _, c, _ in early]))}
    outcomes = early
    if feature is not None:
        last = feature.with_options(early_exit=True, device_copies=False)
        outcomes, feat_s, feat_rows = runtime_mode(last, frames, repeats)
        floop, floop_s, floop_rows = loop_mode(feature, few)
        diffs["feature-loop/feature"] = check_same("feature loop vs feature", floop, outcomes[:loop_frames])
        modes["feature"] = _stats(feat_s, feat_rows)
        modes["feature"]["ms_per_frame_at_batch"] = batch_seconds(last, frames, batch) * 1e3
        modes["feature-loop"] = _stats(floop_s, floop_rows)
        certified["feature"] = float(np.mean([c for _, c, _ in outcomes]))
    if isinstance(last.engines[last.roles[-1]], DeviceMasking):
        on_device = last.with_options(device_copies=True)
        dev, dev_s, dev_rows = runtime_mode(on_device, frames, repeats)
        diffs["host/device copies"] = check_same("host vs device copies", outcomes, dev)
        modes["device-copies"] = _stats(dev_s, dev_rows)
        modes["device-copies"]["ms_per_frame_at_batch"] = batch_seconds(on_device, frames, batch) * 1e3
    verified = {"pixel": pixel.trusted, **({"feature": feature.trusted} if feature is not None else {})}
    return {"modes": modes, "levers": levers(modes), "max_margin_difference": diffs, "certified": certified,
            "verified": verified,
            "frames": len(frames), "loop_frames": len(few), "batch": batch, "repeats": repeats}


def levers(modes: dict) -> dict:
    """Speed-up of each lever (per-frame latency ratio) and its share of the total (share of the log)."""
    chain = [m for m in ("loop", "batched", "early-exit", "feature", "device-copies") if m in modes]
    names = {"batched": "batching", "early-exit": "early exit", "feature": "feature space",
             "device-copies": "device copies"}
    ms = {m: modes[m]["ms_per_frame"] for m in chain}
    total = ms[chain[0]] / ms[chain[-1]]
    out = {"total": total}
    for prev, cur in zip(chain, chain[1:]):
        ratio = ms[prev] / ms[cur]
        out[names[cur]] = {"speedup": ratio, "share": math.log(ratio) / math.log(total) if total > 1 else None}
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["modes"])
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(names, [result["modes"][n]["ms_per_frame"] for n in names], color="#4477aa")
    for i, n in enumerate(names):
        m = result["modes"][n]
        ax.text(i, m["ms_per_frame"], f"{m['ms_per_frame']:.3g} ms\n{m['engine_rows_per_frame']:.0f} rows",
                ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per frame (batch 1, log)")
    ax.set_title(f"double masking, {result['levers']['total']:.1f}x in all "
                 f"({result['machine']['cpu']}, {result['backend']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _frames(data: str | None, hw: tuple[int, int], n: int, seed: int,
            data_dir: str | None = None) -> tuple[np.ndarray, str]:
    if data is None:
        rng = np.random.default_rng(seed)
        return rng.integers(0, 256, size=(n, *hw, 3), dtype=np.uint8), "random"
    from certinfer.train.data import load as load_split

    split = load_split(data, data_dir, hw=hw)
    idx = np.random.default_rng(seed).permutation(len(split.x))[:n]
    return split.x[idx], split.name


cli = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@cli.command("doublemask-speed")
def main(bundle: Path = typer.Argument(..., help="a pixel-space doublemask bundle"),
         feature: Optional[Path] = typer.Option(None, help="a feature-space doublemask bundle (same input size)"),
         data: Optional[str] = typer.Option(None, help="frames from gtsrb:test, cifar10:test or folder:PATH "
                                                       "(default: random frames)"),
         data_dir: Optional[str] = typer.Option(
             None, "--data-dir",
             help="Data folder with gtsrb/ and cifar10/ [default: $CERTINFER_DATA, else shared/data here or above]"),
         frames: int = typer.Option(64, help="frames timed per runtime mode"),
         loop_frames: int = typer.Option(4, help="frames timed in the per-copy loop (slow)"),
         batch: int = typer.Option(32, help="frames per call for the batched throughput"),
         repeats: int = typer.Option(3, help="runs per frame in the runtime modes (the fastest counts)"),
         backend: str = typer.Option("onnxruntime-cpu"),
         threads: Optional[int] = typer.Option(None, help="engine CPU threads"),
         seed: int = typer.Option(0),
         out: Path = typer.Option(Path("bench/results"), help="folder for the JSON and the plot")) -> None:
    """Time the per-copy loop, batching, early exit, feature space and device-built copies on the same frames."""
    from certinfer.bench.machine import machine_info, machine_slug, versions

    pixel = load_certifier(bundle, backend=backend, threads=threads)
    feat = load_certifier(feature, backend=backend, threads=threads) if feature is not None else None
    x, source = _frames(data, pixel.input_hw, frames, seed, data_dir)
    result = speed(pixel, x, feat, loop_frames=loop_frames, batch=batch, repeats=repeats)
    info = machine_info()
    result.update(bundle=str(bundle), feature_bundle=str(feature) if feature else None, data=source,
                  backend=pixel.engine.name, threads=threads, threat=str(pixel.threat), masks=len(pixel.masks),
                  machine=info, versions=versions(), commit=git_commit(),
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{backend}" if backend != "onnxruntime-cpu" else ""
    suffix += f"-{threads}threads" if threads and threads > 1 else ""
    stem = out / f"doublemask-speed-{bundle.resolve().name}-{machine_slug(info)}{suffix}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    for name, m in result["modes"].items():
        typer.echo(f"{name:>13}: {m['ms_per_frame']:9.2f} ms/frame (p50 {m['p50_ms']:.2f}, p99 {m['p99_ms']:.2f}), "
                   f"{m['frames_per_s']:8.1f} frames/s, {m['engine_rows_per_frame']:.0f} rows/frame")
    typer.echo(f"total {result['levers']['total']:.1f}x; wrote {stem}.json and .png")
