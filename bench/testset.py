"""``certinfer bench testset``: a bundle's clean and certified accuracy on a whole test set, per class and per
GTSRB sign group, in shards; and recording the merged result in a packaged bundle's manifest.

Each run writes integer counts per class (images, right, certified and right), so shards (``--shard i/n``) can run
side by side and ``--merge`` adds them up. A frame counts as right when its verdict names the true label (an alert
names none) and as certified when its status is ``certified`` as well: the bundle's own decision rule, through the
runtime on onnxruntime CPU, exactly as a stack would see it.

``--record BUNDLE_FOLDER`` writes a merged result covering the whole split into the bundle's
``provenance.metrics`` (the figures ``certinfer bundles`` lists) together with its batch-1 latency on this
machine, and reseals the manifest. It refuses a result measured on other engine files, another threat or part of
the split; the 500-image ``provenance.check`` that CI re-measures is left as it is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from tqdm import tqdm

from certinfer.bench.groups import group_rates
from certinfer.bench.machine import machine_info, machine_line
from certinfer.bench.measure import batch1_p50_ms
from certinfer.provenance import git_commit
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.evaluate import shard_indices
from certinfer.runtime.loader import load
from certinfer.train.data import load as load_data

CHUNK = 64
BACKEND = "onnxruntime-cpu"
COUNTS = ("images", "right", "certified")


def engines_of(manifest: dict) -> list[str]:
    """What identifies the engines a result was measured on: their files' hashes."""
    return sorted(e["sha256"] for e in manifest["engines"])


def class_counts(certifier, x: np.ndarray, y: np.ndarray, classes: int) -> dict[str, list[int]]:
    """Per true class: images, right (the verdict names the label) and certified and right."""
    right = np.zeros(len(y), bool)
    certified = np.zeros(len(y), bool)
    with tqdm(total=len(y), desc="test set", unit="image", leave=False) as bar:
        for i in range(0, len(y), CHUNK):
            for j, v in enumerate(certifier.certify_frames(x[i:i + CHUNK]), start=i):
                right[j] = v.label == y[j]
                certified[j] = right[j] and v.status == "certified"
            bar.update(min(CHUNK, len(y) - i))
    return {"images": np.bincount(y, minlength=classes).tolist(),
            "right": np.bincount(y[right], minlength=classes).tolist(),
            "certified": np.bincount(y[certified], minlength=classes).tolist()}


def measure(bundle: str, data: str, shard: str = "0/1", data_dir: str | None = None, threads: int = 0) -> dict:
    """One shard's counts, with what they were measured on (``threads``: the engine's; 0: its default)."""
    certifier = load(bundle, backend=BACKEND, engine_options={"threads": threads} if threads else None)
    split = load_data(data, data_dir)
    rows = shard_indices(len(split.y), shard)
    t0 = time.perf_counter()
    counts = class_counts(certifier, split.x[rows], split.y[rows], len(certifier.classes))
    return {"bundle": bundle, "engines": engines_of(certifier.manifest), "threat": str(certifier.threat),
            "data": data, "data_images": int(len(split.y)), "shard": shard, "backend": BACKEND,
            "classes": certifier.classes, "counts": counts, "seconds": time.perf_counter() - t0,
            "commit": git_commit(), "machine": machine_info()}


def merge(results: list[dict]) -> dict:
    """Shards of one bundle, threat and split added up (refused when they differ or overlap)."""
    first = results[0]
    for r in results[1:]:
        for key in ("engines", "threat", "data", "classes"):
            if r[key] != first[key]:
                raise ValueError(f"shards differ in {key}: {first['bundle']} and {r['bundle']}")
    shards = [r["shard"] for r in results]
    if len(set(shards)) != len(shards):
        raise ValueError(f"a shard is given twice: {shards}")
    counts = {k: np.sum([r["counts"][k] for r in results], axis=0).tolist() for k in COUNTS}
    return {**first, "shard": ",".join(shards), "counts": counts,
            "seconds": sum(r["seconds"] for r in results)}


def summary(result: dict) -> dict:
    """Totals, and per GTSRB sign group on GTSRB data, from a result's class counts."""
    images, right, cert = (np.asarray(result["counts"][k]) for k in COUNTS)
    n = int(images.sum())
    groups = group_rates(images, right, cert) if result["data"].startswith("gtsrb") else {}
    return {"n": n, "clean_accuracy": float(right.sum() / max(n, 1)),
            "certified_accuracy": float(cert.sum() / max(n, 1)), "sign_groups": groups}


def record(result: dict, folder: Path, frames: np.ndarray) -> dict:
    """Write a whole-split ``result``, and the batch-1 latency on ``frames`` on this machine (one engine thread),
    into the bundle at ``folder``; reseal it. Returns the new provenance."""
    from certinfer.export.bundle_writer import write_manifest

    bundle = load_bundle(folder)
    m = bundle.manifest
    if result["engines"] != engines_of(m) or result["threat"] != m["threat"]:
        raise ValueError(f"{folder}: the result was measured on other engine files or another threat")
    s = summary(result)
    if s["n"] != result["data_images"]:
        raise ValueError(f"the result covers {s['n']} of {result['data_images']} images: merge every shard first")
    certifier = load(folder, backend=BACKEND, engine_options={"threads": 1})
    m["provenance"]["metrics"] = {
        "backend": BACKEND, "data": result["data"], "data_note": "", "n": s["n"],
        "clean": int(sum(result["counts"]["right"])), "clean_accuracy": s["clean_accuracy"],
        "certified_accuracy": {"default": s["certified_accuracy"]}, "sign_groups": s["sign_groups"],
        "measured_by": "certinfer bench testset", "commit": result["commit"]}
    m["provenance"]["latency"] = {"batch1_p50_ms": batch1_p50_ms(certifier, frames), "backend": BACKEND,
                                  "threads": 1, "machine": machine_line(machine_info())}
    write_manifest(bundle)
    return m["provenance"]


def plot(results: list[dict], path: Path) -> Path:
    """Certified accuracy per sign group, one bar group per bundle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [(Path(r["bundle"]).name, summary(r)) for r in results]
    groups = list(summaries[0][1]["sign_groups"]) + ["all"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(summaries)
    for k, (name, s) in enumerate(summaries):
        values = [s["sign_groups"][g]["certified"] for g in groups[:-1]] + [s["certified_accuracy"]]
        ax.bar(np.arange(len(groups)) + k * width, [100 * v for v in values], width, label=name)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.set_ylabel("certified and right, %")
    ax.set_title(f"{results[0]['data']}: certified accuracy per sign group", fontsize=9)
    ax.legend(fontsize=7, ncols=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


cli = typer.Typer(add_completion=False)


@cli.command("testset")
def testset_command(
    bundle: str = typer.Option("default", "--bundle", "-b", help="Bundle folder, .tar or packaged name"),
    data: str = typer.Option("gtsrb:test", help="Dataset split"),
    shard: str = typer.Option("0/1", help="Measure shard i of n (i/n)"),
    merge_files: list[Path] = typer.Option([], "--merge", help="Add up these shard results instead (repeatable)"),
    record_in: Optional[Path] = typer.Option(None, "--record",
                                             help="Write the merged result into this bundle folder's manifest"),
    compare: list[Path] = typer.Option([], "--compare",
                                       help="Plot these merged results side by side at --out instead (repeatable)"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]"),
    threads: int = typer.Option(0, min=0, help="Engine threads (0: the backend's default)"),
    out: Path = typer.Option(..., help="The result as JSON (with --merge: also a plot beside it)"),
) -> None:
    """Clean and certified accuracy of a bundle on a whole test set, per sign group, in shards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if compare:
        typer.echo(plot([json.loads(f.read_text()) for f in compare], out))
        return
    if merge_files:
        result = merge([json.loads(f.read_text()) for f in merge_files])
        plot([result], out.with_suffix(".png"))
    else:
        result = measure(bundle, data, shard, data_dir, threads)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if record_in is not None:
        record(result, record_in, load_data(result["data"], data_dir).x)
    typer.echo(json.dumps({"bundle": result["bundle"], "shard": result["shard"], **summary(result)}))
