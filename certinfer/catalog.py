"""``certinfer bundles``: the bundles shipped in the package, what each certifies, and how it was made."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from certinfer.bench.measure import batch1_p50_ms
from certinfer.runtime import packaged
from certinfer.runtime.loader import load

PERCENT = ("clean", "certified")
HEAD = ("name", "defense", "kind", "threat", "clean", "certified", "images", "no_sign", "latency_ms", "size_mb")


def _size_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20, 1)


def _sample_frames(count: int) -> np.ndarray:
    from PIL import Image

    files = sorted(packaged.data_dir("samples").glob("gtsrb_test_*.png"))[:count]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def entry(name: str, measure: bool = False) -> dict:
    """One packaged bundle, loaded (so its hashes are checked) and described from its manifest: accuracy and
    latency as recorded there (``certinfer bench testset --record``), or latency measured here with ``measure``."""
    folder = packaged.resolve(name)
    certifier = load(name, backend="onnxruntime-cpu", engine_options={"threads": 1})  # what the latency note says
    provenance = certifier.manifest.get("provenance", {})
    metrics = provenance.get("metrics", {})
    certified = metrics.get("certified_accuracy", {})
    latency = provenance.get("latency", {})
    return {"name": name, "defense": certifier.name, "kind": certifier.kind, "threat": str(certifier.threat),
            "clean": metrics.get("clean_accuracy"),
            "certified": certified.get("default") if isinstance(certified, dict) else certified,
            "images": metrics.get("n"), "data": metrics.get("data") or "gtsrb:test",
            "no_sign": "no sign" in certifier.classes,
            "latency_ms": batch1_p50_ms(certifier, _sample_frames(6), 5) if measure else latency.get("batch1_p50_ms"),
            "latency_on": "here" if measure else latency.get("machine"), "size_mb": _size_mb(folder),
            "sign_groups": metrics.get("sign_groups"), "command": training_command(provenance)}


def training_command(provenance: dict) -> str:
    """The commands that trained a bundle's model: the one that trained the checkpoint it was fine-tuned from
    (``init``), if any, then its own."""
    first = [provenance["init"]["command"]] if (provenance.get("init") or {}).get("command") else []
    return " && ".join([*first, provenance.get("command", "")])


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


def _columns(cells: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]


def _latency_note(rows: list[dict]) -> str:
    where = sorted({r["latency_on"] for r in rows if r["latency_on"]})
    if not where:
        return "latency: not recorded; --measure times each bundle here"
    return f"latency: batch 1, p50, onnxruntime CPU, 1 engine thread, {'; '.join(where)}"


def _groups_table(rows: list[dict]) -> list[str]:
    """Certified accuracy per GTSRB sign group, for the bundles whose manifest records it."""
    grouped = [r for r in rows if r.get("sign_groups")]
    if not grouped:
        return []
    names = list(grouped[0]["sign_groups"])
    cells = [("certified per sign group", *names)]
    cells += [(r["name"], *(_cell("certified", r["sign_groups"].get(g, {}).get("certified")) for g in names))
              for r in grouped]
    return [""] + _columns(cells)


def table(rows: list[dict]) -> str:
    """A plain-text table of the rows (accuracies in percent), certified accuracy per sign group, then each
    bundle's training command."""
    lines = _columns([HEAD] + [tuple(_cell(c, r[c]) for c in HEAD) for r in rows])
    lines += [_latency_note(rows)] + _groups_table(rows)
    lines += [""] + [f"{r['name']}: {r['command']}" for r in rows]
    return "\n".join(lines)
