"""``certinfer bench doublemask-tradeoff``: multiply-adds per certified frame against certified accuracy, for
double-masking bundles in pixel space and in feature space (PatchCURE's split points).

A certified frame runs every distinct one- and two-mask copy: K + K(K-1)/2 copies for K masks, fewer where
feature masks nest (a pair masking what one mask or an earlier pair masks runs once). In pixel space each copy
is the whole classifier; in feature space the front part runs once and the back part once per copy. Multiply-adds
are counted on the bundle's own ONNX graphs (convolutions and matrix products at batch 1), so any wrapped
classifier is counted the same way. Accuracy is the bundle's own decision rule through the runtime on the first
``images`` test images (:func:`certinfer.bench.testset.class_counts`).

Results: ``<out>`` JSON and a plot beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from certinfer.bench.testset import BACKEND, class_counts, summary
from certinfer.provenance import git_commit
from certinfer.runtime.defenses.doublemask import twins
from certinfer.runtime.loader import load
from certinfer.train.data import load as load_data


def _dims(value_info) -> list[int]:
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def onnx_macs(model: bytes) -> int:
    """Multiply-adds of one sample through an ONNX graph: Conv (any groups), Gemm and MatMul nodes."""
    import onnx
    from onnx import numpy_helper, shape_inference

    graph = onnx.load_from_string(model)
    for tensor in graph.graph.input:
        dims = tensor.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1  # the batch
    inferred = shape_inference.infer_shapes(graph).graph
    shapes = {v.name: _dims(v) for v in [*inferred.value_info, *inferred.output, *inferred.input]}
    shapes |= {t.name: list(numpy_helper.to_array(t).shape) for t in inferred.initializer}
    total = 0
    for node in inferred.node:
        if node.op_type == "Conv":
            out, weight = shapes[node.output[0]], shapes[node.input[1]]
            total += int(np.prod(out)) * int(np.prod(weight[1:]))  # each output: C_in/groups x kh x kw
        elif node.op_type in ("Gemm", "MatMul"):
            a, b = shapes[node.input[0]], shapes[node.input[1]]
            trans_b = any(att.name == "transB" and att.i for att in node.attribute)
            total += int(np.prod(a)) * (b[0] if trans_b else b[-1])
    return total


def frame_macs(certifier) -> dict:
    """Multiply-adds of one certified frame of a double-masking certifier (and its parts)."""
    def graph(role: str) -> bytes:
        entry = next(e for e in certifier.bundle.manifest["engines"] if e["role"] == role and e["format"] == "onnx")
        return certifier.bundle.read(entry)

    k = len(certifier.masks)
    copies = k + int((twins(certifier.masks, *certifier.pairs) < 0).sum())  # the distinct copies the runtime runs
    if certifier.space == "pixel":
        model = onnx_macs(graph("model"))
        return {"masks": k, "copies": copies, "model": model, "per_certified_frame": model * copies}
    front, back = onnx_macs(graph("front")), onnx_macs(graph("back"))
    return {"masks": k, "copies": copies, "front": front, "back": back, "per_certified_frame": front + back * copies}


def measure(bundle: str, images: int, data: str = "gtsrb:test", data_dir: str | None = None) -> dict:
    """One bundle's point: its space, split, multiply-adds per certified frame and accuracy on the first images."""
    certifier = load(bundle, backend=BACKEND, engine_options={"threads": 1})
    split = load_data(data, data_dir)
    x, y = split.x[:images], split.y[:images]
    counts = class_counts(certifier, x, y, len(certifier.classes))
    s = summary({"data": data, "counts": counts})
    geometry = certifier.manifest.get("geometry") if certifier.space == "feature" else None
    return {"bundle": bundle, "engines": sorted(e["sha256"] for e in certifier.manifest["engines"]),
            "commit": git_commit(), "space": certifier.space, "split": certifier.params.get("split"),
            "geometry": geometry, "macs": frame_macs(certifier), "data": data, "n": int(len(y)),
            "clean": s["clean_accuracy"], "certified": s["certified_accuracy"], "sign_groups": s["sign_groups"]}


def merge(points: list[dict], earlier: dict) -> list[dict]:
    """``points`` after the points of an earlier result whose bundles were not measured again (each keeps the
    commit it was measured at)."""
    measured = {p["bundle"] for p in points}
    kept = [{"commit": earlier.get("commit"), **p} for p in earlier["points"] if p["bundle"] not in measured]
    return kept + points


def _label(point: dict) -> str:
    name = Path(point["bundle"]).name
    if point["space"] == "pixel":
        return f"{name} (pixel)"
    g = point["geometry"]
    return f"{name} (split {point['split']}: RF {g['rf'][0]}, {g['output_hw'][0]}x{g['output_hw'][1]})"


def plot(points: list[dict], path: Path) -> Path:
    """Certified accuracy against multiply-adds, with the feature-space goal (a tenth of the pixel bundle's
    multiply-adds at most 3 points less certified) shaded when a pixel bundle is among the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    xs = [p["macs"]["per_certified_frame"] / 1e9 for p in points]
    left, right = min(xs) / 3, max(xs) * 3
    pixel = [p for p in points if p["space"] == "pixel"]
    if pixel:
        ref = max(pixel, key=lambda p: p["certified"])
        x_goal, y_goal = ref["macs"]["per_certified_frame"] / 1e10, 100 * ref["certified"] - 3
        left = min(left, x_goal / 3)
        ax.fill_between([left, x_goal], y_goal, 100, color="#55a868", alpha=0.12, lw=0,
                        label="goal: <= 1/10 multiply-adds, >= pixel - 3 points")
    markers = iter("osD^vP*X")
    for p, gmacs in zip(points, xs):
        ax.scatter(gmacs, 100 * p["certified"], marker=next(markers, "o"), s=40,
                   color="#c44e52" if p["space"] == "pixel" else "#4c72b0",
                   label=f"{_label(p)}: clean {100 * p['clean']:.1f}%, certified {100 * p['certified']:.1f}%")
    ax.set_xlim(left, right)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("multiply-adds per certified frame (G, log scale)")
    ax.set_ylabel("certified accuracy, %")
    ax.set_title(f"double masking: pixel vs feature space, {points[0]['data']} first {points[0]['n']}", fontsize=9)
    certs = [100 * p["certified"] for p in points]
    ax.set_ylim(min(certs) - 12, max(certs) + 4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


cli = typer.Typer(add_completion=False)


@cli.command("doublemask-tradeoff")
def tradeoff_command(
    bundles: list[str] = typer.Option(..., "--bundle", "-b", help="Double-masking bundle (repeatable)"),
    images: int = typer.Option(500, min=1, help="The first this many test images"),
    data: str = typer.Option("gtsrb:test", help="Dataset split"),
    data_dir: str = typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]"),
    out: Path = typer.Option(Path("bench/results/doublemask-gtsrb-tradeoff.json"), help="Result JSON"),
    update: bool = typer.Option(False, help="Keep the points of OUT whose bundles are not given (measured before "
                                            "on the same images)"),
) -> None:
    """Multiply-adds per certified frame against certified accuracy, pixel and feature space."""
    points = [measure(b, images, data, data_dir) for b in bundles]
    if update and out.exists():
        earlier = json.loads(out.read_text())
        if any((p["data"], p["n"]) != (data, images) for p in earlier["points"]):
            raise typer.BadParameter(f"{out} holds points measured on other images than the first {images} of {data}")
        points = merge(points, earlier)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"points": points, "commit": git_commit()}, indent=1) + "\n")
    plot(points, out.with_suffix(".png"))
    for p in points:
        typer.echo(f"{_label(p)}: {p['macs']['per_certified_frame'] / 1e9:.2f} G multiply-adds per certified "
                   f"frame, clean {100 * p['clean']:.1f}%, certified {100 * p['certified']:.1f}%")
