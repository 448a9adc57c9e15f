"""Certified accuracy of a Certifier on a labelled dataset, as mergeable counts.

Results hold integer counts (so shards of one dataset merge by addition) plus the rates derived from
them. Variants (:meth:`Certifier.with_options` copies: BagCert's Conditions 3.2 and 3.3, PatchGuard's settings,
other threats) that share an :meth:`Certifier.infer_key` share one inference per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from certinfer.runtime.certifier import Certifier, Decision


def shard_indices(n: int, shard: str | None) -> np.ndarray:
    """Indices of shard ``"i/k"`` (0-based i) of ``n`` samples: contiguous, near-equal slices."""
    if not shard:
        return np.arange(n)
    try:
        i, k = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ValueError(f"shard {shard!r}: use i/k with 0 <= i < k, e.g. 0/4") from None
    if not 0 <= i < k:
        raise ValueError(f"shard {shard!r}: use i/k with 0 <= i < k, e.g. 0/4")
    return np.array_split(np.arange(n), k)[i]


def _empty_counts() -> dict:
    return {"clean": 0, "certified": 0, "alert": 0, "per_rect": {}}


def _add(counts: dict, decisions: list[Decision], y: np.ndarray, threat_keys: tuple[str, ...] | None) -> None:
    for d, label in zip(decisions, y):
        correct = d.label == int(label)
        per_rect = d.certificate.per_rect
        whole = all(per_rect[k].certified for k in threat_keys) if threat_keys else d.certificate.certified
        counts["clean"] += int(correct)
        counts["certified"] += int(correct and whole)
        counts["alert"] += int(d.status == "alert")
        for key, rc in d.certificate.per_rect.items():
            counts["per_rect"][key] = counts["per_rect"].get(key, 0) + int(correct and rc.certified)


def _groups(variants: dict[str, Certifier]) -> list[list[str]]:
    """Variant names grouped by inference key, in first-seen order."""
    groups: dict[tuple, list[str]] = {}
    for name, variant in variants.items():
        groups.setdefault(variant.infer_key(), []).append(name)
    return list(groups.values())


def evaluate_certifier(certifier: Certifier, x: np.ndarray, y: np.ndarray, batch: int = 256,
                       variants: dict[str, Certifier] | None = None,
                       progress: Callable[[int], None] | None = None,
                       threat_keys: tuple[str, ...] | None = None) -> dict:
    """Clean and certified accuracy on uint8 (N, H, W, 3) images ``x`` with labels ``y``.

    ``variants``: named certifiers derived from ``certifier`` with :meth:`Certifier.with_options` (default: the
    certifier itself as ``default``). Each batch is inferred once per group of variants with equal
    :meth:`Certifier.infer_key` and certified by every variant of the group. Each variant counts its own clean
    accuracy (PatchGuard's variants predict differently); the top-level ``clean`` is the first variant's.

    ``threat_keys``: the rectangles that make up "certified" for the threat as a whole (default: all of the
    certificate's); the others are still counted per rectangle.
    """
    variants = variants or {"default": certifier}
    groups = _groups(variants)
    counts = {name: _empty_counts() for name in variants}
    seconds = {"prepare": 0.0, "engine": 0.0, "certify": 0.0}
    for i in range(0, len(y), batch):
        frames, labels = x[i:i + batch], y[i:i + batch]
        for group in groups:
            features, spent = variants[group[0]].timed_features(frames)
            seconds["prepare"] += spent["prepare"]
            seconds["engine"] += spent["engine"]
            t0 = time.perf_counter()
            for name in group:
                _add(counts[name], variants[name].certify(features), labels, threat_keys)
            seconds["certify"] += time.perf_counter() - t0
        if progress:
            progress(len(frames))
    first = counts[next(iter(variants))]
    return summarize({"n": int(len(y)), "clean": first["clean"], "variants": counts, "seconds": seconds,
                      "threat": str(certifier.threat), "backend": certifier.engine.name})


def summarize(result: dict) -> dict:
    """Add the rates derived from a result's counts (idempotent)."""
    n = max(result["n"], 1)
    out = dict(result)
    out["clean_accuracy"] = result["clean"] / n
    out["clean_accuracy_per_variant"] = {name: c.get("clean", result["clean"]) / n
                                         for name, c in result["variants"].items()}
    out["certified_accuracy"] = {name: c["certified"] / n for name, c in result["variants"].items()}
    out["certified_accuracy_per_rect"] = {name: {k: v / n for k, v in c["per_rect"].items()}
                                          for name, c in result["variants"].items()}
    total = sum(result["seconds"].values())
    out["images_per_second"] = result["n"] / total if total > 0 else None
    return out


def merge(results: list[dict]) -> dict:
    """Combine shard results of one dataset, bundle and threat by adding their counts."""
    if not results:
        raise ValueError("nothing to merge")
    keys = {(r["threat"], tuple(sorted(r["variants"]))) for r in results}
    if len(keys) != 1:
        raise ValueError(f"shard results disagree on threat or variants: {sorted(keys)}")
    merged = {"n": 0, "clean": 0, "seconds": {}, "threat": results[0]["threat"], "backend": results[0]["backend"],
              "variants": {name: _empty_counts() for name in results[0]["variants"]}}
    for r in results:
        merged["n"] += r["n"]
        merged["clean"] += r["clean"]
        for k, v in r["seconds"].items():
            merged["seconds"][k] = merged["seconds"].get(k, 0.0) + v
        for name, c in r["variants"].items():
            m = merged["variants"][name]
            m["clean"] += c.get("clean", r["clean"])
            m["certified"] += c["certified"]
            m["alert"] += c["alert"]
            for key, v in c["per_rect"].items():
                m["per_rect"][key] = m["per_rect"].get(key, 0) + v
    return summarize(merged)
