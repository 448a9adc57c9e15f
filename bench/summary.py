"""``certinfer bench summary``: every defense's latency results side by side, and certified accuracy vs latency.

Reads the ``certinfer bench latency`` results (``latency-*.json``) and the ``certinfer certify`` results (any other
JSON with ``certified_accuracy`` and ``bundle``) in a folder; writes two plots (latency by defense and backend;
certified accuracy vs per-frame latency) and prints the README's markdown table; with ``--page``, it also writes
the results page (``docs/results.md``, from every result of the folder: ``results_page.py``). A certify result
belongs to a latency result when their bundle folders have the same name (benchmarks may run on a copy of a bundle).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from certinfer.bench.machine import machine_line, machine_slug
from certinfer.bench.plots import defense_label, markdown_table, measured
from certinfer.bench.results_page import read_results, write_page

MARKERS = {"onnxruntime-cpu": "o", "torch-cpu": "s", "onnxruntime-cuda": "D", "torch-cuda": "v",
           "torch-cuda-graphs": "P", "tensorrt": "*"}


def load_results(folder: Path) -> tuple[list[dict], list[dict]]:
    """(latency results, certify results) among the JSON files of ``folder``."""
    found = read_results(folder)
    return found.latency, found.certify


def certify_key(latency: dict) -> list[str]:
    """The keys under which ``certinfer certify`` reports the bundle's own decision rule, best first."""
    from certinfer.bench.certify import evaluation_of

    d = latency["bundle"]["defense"]
    return evaluation_of(d["kind"]).own_keys(d.get("params", {}), latency["bundle"]["threat"])


def _value(c: dict, key: str, threat: str, rect_keys: list[str]) -> float | None:
    """Certified accuracy under ``key`` against the bundle's threat: the whole entry when certify used that
    threat, else the entry's per-rectangle value where the bundle's threat is one rectangle."""
    if c.get("threat") == threat and key in c["certified_accuracy"]:
        return c["certified_accuracy"][key]
    per = c.get("certified_accuracy_per_rect", {}).get(key, {})
    return per.get(rect_keys[0]) if len(rect_keys) == 1 else None


def certified_accuracy(latency: dict, certify: list[dict]) -> dict | None:
    """The bundle's certified accuracy against its own threat, from the certify results of the same bundle
    folder: the largest dataset, then the last file by name (the same on every checkout)."""
    from certinfer.threat import parse, rect_key

    b = latency["bundle"]
    threat = b["threat"]
    rect_keys = [rect_key(r) for r in parse(threat, input_hw=tuple(b["input_hw"])).rects]
    found = []
    for c in certify:
        if Path(c["bundle"]).name != Path(b["path"]).name:
            continue
        for key in certify_key(latency):
            value = _value(c, key, threat, rect_keys)
            if value is not None:
                found.append({"value": value, "key": key, "data": c.get("data"), "n": c.get("n") or 0,
                              "threat": threat, "file": c["file"]})
    return max(found, key=lambda f: (f["n"], f["file"])) if found else None


def plot_latency(results: list[dict], path: Path) -> Path:
    """Per-frame ms by defense (one group each) and backend: batch-1 p50 and the best batch (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    backends = sorted({b["engine"] for r in results for b in measured(r).values()})
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(results)), 4.5))
    width = 0.8 / max(1, 2 * len(backends))
    for j, engine in enumerate(backends):
        for k, (what, hatch) in enumerate((("batch 1 p50", ""), ("best batch", "//"))):
            xs, ys = [], []
            for i, r in enumerate(results):
                b = next((b for b in measured(r).values() if b["engine"] == engine), None)
                if b is not None:
                    xs.append(i + (2 * j + k - len(backends) + 0.5) * width)
                    ys.append(b["batch1"]["stages_ms"]["total"]["p50"] if k == 0
                              else b["best_batch"]["per_frame_ms"]["total"])
            ax.bar(xs, ys, width, label=f"{engine}, {what}", color=f"C{j}", hatch=hatch, edgecolor="white")
    ax.set_xticks(np.arange(len(results)), [f"{defense_label(r)}\n{Path(r['bundle']['path']).name}" for r in results],
                  fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per certified frame (log scale)")
    ax.set_title("latency by defense and backend")
    ax.legend(fontsize=7)
    fig.suptitle(_machine_line(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy_vs_latency(results: list[dict], certify: list[dict], path: Path) -> Path:
    """Certified accuracy (from certify results) against per-frame latency, one point per bundle and backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = False
    for i, r in enumerate(results):
        acc = certified_accuracy(r, certify)
        if acc is None:
            continue
        plotted = True
        points = [(b["batch1"]["stages_ms"]["total"]["p50"], b["engine"]) for b in measured(r).values()]
        for ms, engine in points:
            ax.scatter([ms], [acc["value"]], color=f"C{i}", marker=MARKERS.get(engine, "^"))
        ax.annotate(f"{defense_label(r)} ({acc['data']}, {r['bundle']['threat']})", (min(points)[0], acc["value"]),
                    fontsize=7, xytext=(0, 6), textcoords="offset points")
    for engine, marker in MARKERS.items():
        ax.scatter([], [], color="gray", marker=marker, label=engine)
    ax.legend(fontsize=7)
    if plotted:
        ax.set_xscale("log")
    ax.set_xlabel("ms per frame at batch 1 (p50, log scale)")
    ax.set_ylabel("certified accuracy (certinfer certify)")
    ax.set_title("certified accuracy vs latency")
    fig.suptitle(_machine_line(results), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _by_machine(results: list[dict]) -> dict[str, list[dict]]:
    """Latency results grouped by :func:`machine_slug`, in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(machine_slug(r["machine"]), []).append(r)
    return groups


def _machine_line(results: list[dict]) -> str:
    return "; ".join(sorted({machine_line(r["machine"]) for r in results}))


cli = typer.Typer(add_completion=False)


@cli.command("summary")
def summary_command(
    results: Path = typer.Option(Path("bench/results"), help="Folder of latency and certify result JSON files"),
    out_dir: Path = typer.Option(None, help="Folder for the plots [default: --results]"),
    page: Path = typer.Option(None, help="Also write the results page (every result of --results as markdown) "
                                         "to this file, e.g. docs/results.md"),
) -> None:
    """Plots of every latency result (by defense and backend; certified accuracy vs latency) and the table;
    with --page, the results page too."""
    latency, certify = load_results(results)
    if not latency and page is None:
        raise ValueError(f"no latency results (latency-*.json) in {results}")
    if page is not None:
        typer.echo(f"results page: {write_page(results, page)}")
    if not latency:
        return
    out = Path(out_dir or results)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for tag, runs in _by_machine(latency).items():  # times from different machines do not share an axis
        paths += [plot_latency(runs, out / f"summary-latency-{tag}.png"),
                  plot_accuracy_vs_latency(runs, certify, out / f"summary-accuracy-vs-latency-{tag}.png")]
    typer.echo(markdown_table(latency))
    for r in latency:
        acc = certified_accuracy(r, certify)
        typer.echo(f"{Path(r['bundle']['path']).name}: certified accuracy "
                   + (f"{acc['value']:.3f} ({acc['key']}, {acc['data']}, {acc['file']})" if acc else "n/a"))
    typer.echo(json.dumps([str(p) for p in paths]))
