"""``certinfer bundles``: the bundles shipped in the package, what each certifies, and how it was made."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from certinfer.runtime import packaged
from certinfer.runtime.loader import load

PERCENT = ("clean", "certified")
HEAD = ("name", "defense", "kind", "threat", "clean", "certified", "images", "no_sign", "latency_ms", "size_mb")


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


def _latency_ms(certifier, repeats: int = 5) -> float:
    """Batch-1 p50 over the packaged sample frames (the first call, which pays engine set-up, not counted)."""
    from PIL import Image

    files = sorted(packaged.data_dir("samples").glob("gtsrb_test_*.png"))[:repeats + 1]
    frames = [np.asarray(Image.open(f).convert("RGB"))[None] for f in files]
    times = []
    for frame in frames:
        t0 = time.perf_counter()
        certifier(frame)
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times[1:]), 2)


def entry(name: str, measure: bool = False) -> dict:
    """One packaged bundle, loaded (so its hashes are checked) and described from its manifest."""
    folder = packaged.resolve(name)
    certifier = load(name)
    metrics = certifier.manifest.get("provenance", {}).get("metrics", {})
    certified = metrics.get("certified_accuracy", {})
    return {"name": name, "defense": certifier.name, "kind": certifier.kind, "threat": str(certifier.threat),
            "clean": metrics.get("clean_accuracy"),
            "certified": certified.get("default") if isinstance(certified, dict) else certified,
            "images": metrics.get("n"), "data": metrics.get("data") or "gtsrb:test",
            "no_sign": "no sign" in certifier.classes,
            "latency_ms": _latency_ms(certifier) if measure else None, "size_mb": _size_mb(folder),
            "command": certifier.manifest.get("provenance", {}).get("command", "")}


def catalog(measure: bool = False) -> list[dict]:
    """Every packaged bundle, ``default`` first."""
    return [entry(name, measure) for name in packaged.bundle_names()]


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column in PERCENT:
        return f"{100 * value:.1f}%"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def table(rows: list[dict]) -> str:
    """A plain-text table of the rows (accuracies in percent), then each bundle's training command."""
    cells = [HEAD] + [tuple(_cell(c, r[c]) for c in HEAD) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEAD))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    lines += [""] + [f"{r['name']}: {r['command']}" for r in rows]
    return "\n".join(lines)
