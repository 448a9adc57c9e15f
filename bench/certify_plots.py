"""Plots of ``certinfer certify`` results: certified accuracy per rectangle, per variant, and each paper's figures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

# ScaleCert's own CIFAR-10 numbers (paper Table 2, ResNet-18): threat -> (clean, certified detection), percent.
SCALECERT_TABLE2 = {"2.4%": (78.9, 75.3), "0.4%": (83.1, 81.0)}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(result: dict, name: str, detail: str = "", sep: str = " (", end: str = ")") -> str:
    """``<name> on <data><detail>`` plus the data's note between ``sep`` and ``end``."""
    title = f"{name} on {result['data']}{detail}"
    return title + (f"{sep}{result['data_note']}{end}" if result.get("data_note") else "")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def _square_side(key: str) -> int | None:
    h, w = key.split("x")
    return int(h) if h == w else None


def _split_rects(per_rect: dict[str, dict[str, float]]) -> tuple[dict, dict]:
    """Per series: its square rectangles as [(side, accuracy)] by side, and its other rectangles as {key: accuracy}."""
    squares = {name: sorted((_square_side(k), v) for k, v in per.items() if _square_side(k))
               for name, per in per_rect.items()}
    others = {name: {k: v for k, v in per.items() if not _square_side(k)} for name, per in per_rect.items()}
    return squares, others


def _plot_squares(ax, squares: dict[str, list[tuple[int, float]]]) -> None:
    for i, (name, points) in enumerate(squares.items()):
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", color=f"C{i}", label=f"certified ({name})")
    ax.set_xticks(sorted({s for points in squares.values() for s, _ in points}))
    ax.set_xlabel("square patch side (model-input pixels)")


def _plot_others(ax, others: dict[str, dict[str, float]]) -> None:
    keys = list(dict.fromkeys(k for per in others.values() for k in per))
    width = 0.8 / len(others)
    for i, (name, per) in enumerate(others.items()):
        ax.bar([j + i * width for j in range(len(keys))], [per.get(k, 0.0) for k in keys], width, color=f"C{i}",
               label=f"certified ({name})")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, rotation=45)
    ax.set_xlabel("non-square patches (h x w)")


def plot_rects(result: dict, path: Path) -> None:
    """Certified accuracy against square patch side (BagCert Fig. 3) and for every other rectangle, one colour per
    series (e.g. BagCert's conditions); a panel only where there are such rectangles."""
    squares, others = _split_rects(result["certified_accuracy_per_rect"])
    panels = [(draw, data) for draw, data in ((_plot_squares, squares), (_plot_others, others))
              if any(data.values())] or [(_plot_squares, squares)]
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(5 + 6 * (len(panels) - 1), 4), squeeze=False)
    for ax, (draw, data) in zip(axes[0], panels):
        draw(ax, data)
        ax.axhline(result["clean_accuracy"], color="grey", linestyle="--", label="clean")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    fig.suptitle(_title(result, result["defense"]["kind"]))
    _save(fig, path)


def plot_variants(result: dict, path: Path) -> None:
    """Clean and certified accuracy of every ``name@threat`` variant, grouped by threat."""
    names = list(result["certified_accuracy"])
    fig, ax = _pyplot().subplots(figsize=(max(5, 1.2 * len(names)), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [result["clean_accuracy_per_variant"][n] for n in names], 0.4, label="clean")
    ax.bar([x + 0.2 for x in xs], [result["certified_accuracy"][n] for n in names], 0.4, label="certified")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title(_title(result, result["defense"]["kind"]), fontsize=9)
    _save(fig, path)


def _crop_counts(acc: dict, prefix: str) -> list[int]:
    return sorted(int(m.group(1)) for k in acc if (m := re.fullmatch(rf"{prefix}(\d+)", k)))


def plot_cropping(result: dict, path: Path) -> None:
    """Paper Tables 3 to 5 as plots: certified accuracy against p_c threshold, number of crops (R / NR), shape."""
    acc = result["certified_accuracy"]
    fig, (thr, crops, shape) = _pyplot().subplots(1, 3, figsize=(14, 4))
    ts = [0.93, 0.95, 0.97, 0.99]
    thr.plot(ts, [acc["r128" if t == 0.95 else f"r128-p{t}"] for t in ts], marker="o")
    thr.set_xlabel("p_c threshold (128 crops, with replacement)")
    for prefix, label in (("r", "with replacement"), ("nr", "without replacement")):
        ns = _crop_counts(acc, prefix)
        crops.plot(ns, [acc[f"{prefix}{n}"] for n in ns], marker="o", label=f"certified, {label}")
        crops.plot(ns, [result["clean_accuracy_per_variant"][f"{prefix}{n}"] for n in ns], linestyle=":",
                   label=f"clean, {label}")
    crops.axhline(acc["exhaustive"], color="black", linestyle="--", label="exhaustive (deterministic)")
    crops.set_xscale("log", base=2)
    crops.set_xlabel("crops per image")
    crops.legend(fontsize=7)
    per = result["certified_accuracy_per_rect"]["r128@shapes"]
    names = list(per)
    shape.bar(range(len(names)), [per[k] for k in names], 0.4, label="128 crops")
    shape.bar([i + 0.4 for i in range(len(names))], [result["certified_accuracy_per_rect"]["exhaustive@shapes"][k]
                                                     for k in names], 0.4, label="exhaustive")
    shape.set_xticks([i + 0.2 for i in range(len(names))], names)
    shape.set_xlabel("patch rectangle (rot45:5x5 is 8x8)")
    shape.legend(fontsize=7)
    for ax in (thr, crops, shape):
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
    detail = f" ({result['n']} images, threat {result['threat']})"
    fig.suptitle(_title(result, "randomized cropping", detail, "; ", ""), fontsize=9)
    _save(fig, path)


def plot_scalecert(result: dict, path: Path) -> None:
    """Clean and certified detection accuracy per threat, windows per image, the paper's CIFAR-10 Table 2 beside."""
    names = list(result["certified_accuracy"])
    fig, ax = _pyplot().subplots(figsize=(max(5, 2.2 * len(names)), 4))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [result["clean_accuracy_per_variant"][n] for n in names], 0.4, label="clean (ours)")
    ax.bar(xs + 0.2, [result["certified_accuracy"][n] for n in names], 0.4, label="certified detection (ours)")
    if str(result.get("data", "")).startswith("cifar10"):
        for x, p in zip(xs, [SCALECERT_TABLE2.get(n) for n in names]):
            if p:
                ax.plot([x - 0.4, x], [p[0] / 100] * 2, color="black", linestyle="--")
                ax.plot([x, x + 0.4], [p[1] / 100] * 2, color="black", linestyle=":")
        ax.plot([], [], color="black", linestyle="--", label="paper Table 2 clean (exact CIFAR-10)")
        ax.plot([], [], color="black", linestyle=":", label="paper Table 2 certified")
    extra = result.get("scalecert", {})
    ax.set_xticks(list(xs), [f"{n}\n{extra.get(n, {}).get('windows_per_image', 0):.1f} windows/image, "
                             f"{extra.get(n, {}).get('ms_per_image', 0):.0f} ms" for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.set_title(_title(result, "ScaleCert", f" ({result['n']} images, {result['backend']})", "\n", ""), fontsize=9)
    _save(fig, path)


def plot_ibp(result: dict, path: Path) -> None:
    """Certified accuracy per rectangle (the threat's, then the shape-transfer ones), clean accuracy as a line."""
    per = next(iter(result["certified_accuracy_per_rect"].values()))
    names = list(per)
    fig, ax = _pyplot().subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
    ax.bar(range(len(names)), [per[k] for k in names], 0.6, label="certified")
    for i, k in enumerate(names):
        ax.text(i, per[k] + 0.01, f"{100 * per[k]:.1f}", ha="center", fontsize=8)
    ax.axhline(result["clean_accuracy"], color="grey", linestyle="--", label="clean")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel(f"patch rectangle (threat {result['threat']}; shape transfer: {result.get('shapes') or 'none'})")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    ax.set_title(_title(result, "IBP", f" ({result['n']} images)", "; ", ""), fontsize=9)
    _save(fig, path)
