"""Export a double-masking bundle: from a checkpoint of ``certinfer train doublemask``, or around any ONNX classifier.

Pixel space: one graph (role ``model``) maps normalized NCHW float32 frames to logits; the runtime masks the
frames. Feature space (PatchCURE): the checkpoint's network cut after ``--split`` units into a ``front`` graph
(frames -> NCHW feature map, with the manifest's ``geometry``) and a ``back`` graph (masked feature map -> logits);
the front's receptive field is probed bit for bit on onnxruntime CPU (outputs outside ``Geometry.affected`` must
not change), or the export fails.

A foreign classifier (``CLASSIFIER.onnx``, (N, 3, H, W) normalized -> (N, C)) is checked for a dynamic batch, the
declared class count, and rows that do not depend on the rest of their batch (a masked copy is certified from its
own row alone); its accuracy is then measured through the runtime on the data given.

Every bundle records the mask stride and the masked value (``defense.params``): they must be the ones the
classifier was trained with, and the runtime applies exactly these.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from certinfer.export import ExportError
from certinfer.export.exporter import (CHECK_IMAGES, SHORT_CHECK_IMAGES, cpu_session, eval_split, float_parity,
                                       load_trained, manifest, onnx_engine, prepare, publish, summary)
from certinfer.export.onnx_export import export_onnx
from certinfer.export.probe import export_batch_probe, probe
from certinfer.export.torch_weights import torch_engine
from certinfer.provenance import git_commit
from certinfer.runtime.certifier import TIE_TOLERANCE
from certinfer.runtime.defenses.doublemask import rows_per_call
from certinfer.runtime.geometry import Geometry
from certinfer.threat import parse
from certinfer.train import data as datasets
from certinfer.train.background import check_classes
from certinfer.train import models
from certinfer.train.models.doublemask import Back, Classifier, Front, classifier, geometry

DEFENSE = "doublemask"
PARITY_FRAMES = 256  # test frames for torch parity and for every other backend against onnxruntime CPU
MAX_BATCH = 1024


def load_classifier(checkpoint: str | Path) -> tuple[Classifier, dict]:
    state, meta = load_trained(checkpoint, DEFENSE)
    net = classifier(meta["num_classes"], meta["config"]["model"])
    net.load_state_dict(state)
    return net.eval(), meta


def _torch_entry(module: torch.nn.Module, kind: str, meta: dict, input_shape: tuple[int, ...], role: str,
                 file: str, **extra) -> tuple[dict, bytes]:
    config = models.config(kind, meta["num_classes"], meta["config"]["model"], input_shape, **extra)
    entry, weights = torch_engine(module, config, MAX_BATCH)
    return {**entry, "file": file, "role": role}, weights


def _logits_parity(module: torch.nn.Module, onnx: bytes, x: np.ndarray, what: str) -> dict:
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    got = cpu_session(onnx).run(None, {"input": x})[0]
    return float_parity(ref, got, what, images=len(x))


def _batch_checked(onnx: bytes, rows: np.ndarray, max_batch: int, what: str, copies: bool = True) -> dict:
    """The batch probe of one graph on onnxruntime CPU: a masked copy is certified from its own row alone, so every
    row must get the same output bits whatever batch it runs in (the runtime's batches go up to ``max_batch``).
    A graph that runs masked ``copies`` is checked at every size a CPU engine call of them can have."""
    sizes = range(1, rows_per_call(rows[0].nbytes, cpu=True) + 1) if copies else ()
    return export_batch_probe(cpu_session(onnx), rows, max_batch, sizes, what, "double masking needs each row "
                              "computed from its own input alone (no batch statistics or batch-coupled operations)")


def _pixel_parts(net: Classifier, meta: dict, x: np.ndarray) -> tuple[dict, list[dict], dict, dict]:
    """(files, engines, parity, sections) of a pixel-space bundle."""
    onnx = export_onnx(net, (torch.from_numpy(x[:2]),), ["input"], ["logits"])
    entry, weights = _torch_entry(net, "doublemask-classifier", meta, x.shape[1:], "model", "model.safetensors")
    parity = {"torch_vs_onnxruntime-cpu": _logits_parity(net, onnx, x, "classifier graph")}
    sections = {"probe": {"backend": "onnxruntime-cpu", "role": "model",
                          "batch": _batch_checked(onnx, x, MAX_BATCH, "the classifier"),
                          "exact_backends": ["onnxruntime-cpu"]}}
    return {"model.onnx": onnx, "model.safetensors": weights}, [onnx_engine(MAX_BATCH), entry], parity, sections


def _feature_parts(net: Classifier, meta: dict, x: np.ndarray, split: int, rects: list[tuple[int, int]],
                   probe_trials: int) -> tuple[dict, list[dict], dict, dict]:
    """(files, engines, parity, sections) of a feature-space bundle cut after ``split`` units."""
    if not 0 < split < len(net.units):
        raise ExportError(f"split {split}: the front takes 1 to {len(net.units) - 1} of the {len(net.units)} units")
    geo = Geometry.from_dict(geometry(net.unit_specs, split, tuple(meta["input_hw"])))
    front, back = Front(net, split).eval(), Back(net, split).eval()
    with torch.no_grad():
        feats = front(torch.from_numpy(x))
    if tuple(feats.shape[2:]) != geo.output_hw:
        raise ExportError(f"front output {tuple(feats.shape[2:])} is not the geometry's {geo.output_hw}")
    front_onnx = export_onnx(front, (torch.from_numpy(x[:2]),), ["input"], ["features"])
    back_onnx = export_onnx(back, (feats[:2],), ["input"], ["logits"])
    session = cpu_session(front_onnx)
    report = probe(lambda b: session.run(None, {"input": b})[0].transpose(0, 2, 3, 1), x, geo, rects + [(1, 1)],
                   trials=probe_trials)
    f = feats.numpy()
    parity = {"front_torch_vs_onnxruntime-cpu": float_parity(f, session.run(None, {"input": x})[0], "front graph",
                                                             images=len(x)),
              "back_torch_vs_onnxruntime-cpu": _logits_parity(back, back_onnx, f, "back graph")}
    # Both torch parts wrap the whole classifier, so they load the same weights file.
    front_entry, weights = _torch_entry(front, "doublemask-front", meta, x.shape[1:], "front",
                                        "classifier.safetensors", split=split)
    back_entry, _ = _torch_entry(back, "doublemask-back", meta, f.shape[1:], "back", "classifier.safetensors",
                                 split=split)
    engines = [onnx_engine(MAX_BATCH, "front.onnx", "front"), onnx_engine(MAX_BATCH, "back.onnx", "back"),
               front_entry, back_entry]
    files = {"front.onnx": front_onnx, "back.onnx": back_onnx, "classifier.safetensors": weights}
    batch = {"front": _batch_checked(front_onnx, x, MAX_BATCH, "the front part", copies=False),
             "back": _batch_checked(back_onnx, f, MAX_BATCH, "the back part")}
    sections = {"geometry": geo.to_dict(),
                "probe": {"backend": "onnxruntime-cpu", "role": "front", **report, "batch": batch,
                          "exact_backends": ["onnxruntime-cpu"]}}
    return files, engines, parity, sections


def export_checkpoint(checkpoint: Path, out: Path, space: str = "pixel", split: int | None = None,
                      threat: str | None = None, stride: int | None = None, probe_trials: int = 96,
                      data_dir: str | None = None, data: str | None = None, limit: int | None = None) -> dict:
    """Write a bundle from a trained checkpoint (its mask stride, masked value and threat unless overridden);
    returns the manifest as written."""
    net, meta = load_classifier(checkpoint)
    hw = tuple(meta["input_hw"])
    mask = meta["mask"]
    threat = threat or mask["threat"]
    rects = list(parse(threat, input_hw=hw).rects)  # fail early on a threat that does not fit
    test = eval_split(meta, hw, data_dir, data, limit)
    x = prepare(test.x[:PARITY_FRAMES], hw, meta["mean"], meta["std"])
    if space == "pixel":
        files, engines, parity, sections = _pixel_parts(net, meta, x)
    elif space == "feature":
        split = split if split is not None else max(meta["config"].get("feature_splits") or [0])
        files, engines, parity, sections = _feature_parts(net, meta, x, split, rects, probe_trials)
    else:
        raise ExportError(f"space must be pixel or feature, got {space!r}")
    params = {"space": space, "stride": int(stride or mask["stride"]), "mask_value": float(mask["value"]),
              "tolerance": TIE_TOLERANCE, **({"split": split} if space == "feature" else {})}
    m = manifest(DEFENSE, params, hw, meta["mean"], meta["std"], meta["classes"], threat, engines, parity, meta,
                 {"trained_mask": mask, "epochs": meta.get("epoch"), "train_minutes": meta.get("minutes"),
                  "train_history": meta.get("history", [])[-1:]}, **sections)
    return publish(out, m, files, test, parity_frames=test.x[:PARITY_FRAMES],
                   check_images=SHORT_CHECK_IMAGES if space == "pixel" else CHECK_IMAGES)


def _check_classifier(onnx: bytes, hw: tuple[int, int], classes: int, x: np.ndarray) -> tuple[int, dict]:
    """(max batch, batch probe): the graph takes (N, 3, H, W) float32 and returns (N, classes), with each row
    computed from its own frame alone, bit for bit (see :func:`_batch_checked`)."""
    session = cpu_session(onnx)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise ExportError(f"the classifier must take one (N, 3, H, W) input, got {[i.shape for i in inputs]}")
    batch, channels, *size = inputs[0].shape
    if isinstance(batch, int) and batch != 1:
        raise ExportError(f"the classifier has a fixed batch of {batch}: export it with a dynamic (or 1) batch axis")
    if channels not in (3, None) and not isinstance(channels, str):
        raise ExportError(f"the classifier takes {channels} channels, not 3")
    if any(isinstance(s, int) and s != n for s, n in zip(size, hw)):
        raise ExportError(f"the classifier takes {size[0]}x{size[1]} frames, not --input-hw {hw[0]}x{hw[1]}")
    name = inputs[0].name
    together = session.run([outputs[0].name], {name: x if not isinstance(batch, int) else x[:batch]})[0]
    if together.ndim != 2 or together.shape[1] != classes:
        raise ExportError(f"the classifier returns {together.shape[1:]} per frame, expected ({classes},) logits "
                          f"(one per line of --classes)")
    max_batch = 1 if isinstance(batch, int) else MAX_BATCH
    return max_batch, _batch_checked(onnx, x, max_batch, "the classifier")


def _rename_io(onnx: bytes) -> bytes:
    """The graph with its input named ``input`` and its first output ``logits`` (the runtime's names)."""
    import onnx as onnx_lib

    model = onnx_lib.load_from_string(onnx)
    old_in, old_out = model.graph.input[0].name, model.graph.output[0].name
    for node in model.graph.node:
        node.input[:] = ["input" if n == old_in else n for n in node.input]
        node.output[:] = ["logits" if n == old_out else n for n in node.output]
        node.input[:] = ["logits" if n == old_out else n for n in node.input]
    model.graph.input[0].name, model.graph.output[0].name = "input", "logits"
    del model.graph.output[1:]
    onnx_lib.checker.check_model(model)
    return model.SerializeToString()


def export_classifier(classifier_onnx: Path, out: Path, input_hw: tuple[int, int], classes: list[str],
                      mean: list[float], std: list[float], threat: str, stride: int, data: str,
                      mask_value: float = 0.0, limit: int | None = 500, data_dir: str | None = None,
                      command: str = "") -> dict:
    """Wrap an existing ONNX classifier (normalized (N, 3, H, W) -> (N, C) logits) into a pixel-space bundle,
    measured on ``data``; returns the manifest as written."""
    raw = Path(classifier_onnx).read_bytes()
    parse(threat, input_hw=input_hw)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ExportError("--mean and --std take three values each (std > 0), on the [0, 1] pixel scale")
    onnx = _rename_io(raw)
    split = datasets.load(data, data_dir, input_hw)
    try:
        check_classes(classes, split.classes, data)
    except ValueError as e:
        raise ExportError(str(e)) from None
    test = eval_split({"dataset": {"test": data}}, input_hw, data_dir, data, limit)
    x = prepare(test.x[:PARITY_FRAMES], input_hw, mean, std)
    max_batch, rows = _check_classifier(onnx, input_hw, len(classes), x[:16])
    meta = {"command": command, "dataset": {"test": test.name, "note": test.note}, "commit": git_commit()}
    source = {"classifier": Path(classifier_onnx).name, "classifier_sha256": hashlib.sha256(raw).hexdigest()}
    params = {"space": "pixel", "stride": int(stride), "mask_value": float(mask_value), "tolerance": TIE_TOLERANCE}
    m = manifest(DEFENSE, params, input_hw, mean, std, classes, threat, [onnx_engine(max_batch)], {}, meta, source,
                 probe={"backend": "onnxruntime-cpu", "role": "model", "batch": rows,
                        "exact_backends": ["onnxruntime-cpu"]})
    return publish(out, m, {"model.onnx": onnx}, test, parity_frames=test.x[:PARITY_FRAMES],
                   check_images=SHORT_CHECK_IMAGES)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise ExportError(f"{what}: expected numbers, got {text!r}") from None


def _hw(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    if not (h.isdigit() and w.isdigit()):
        raise ExportError(f"--input-hw: expected HxW such as 32x32, got {text!r}")
    return int(h), int(w)


cli = typer.Typer(add_completion=False)


@cli.command(DEFENSE)
def export_command(
    source: Path = typer.Argument(..., help="model.safetensors from certinfer train doublemask, or any "
                                            "CLASSIFIER.onnx mapping normalized (N, 3, H, W) frames to (N, C) logits"),
    out: Path = typer.Argument(..., help="Bundle folder to write"),
    space: str = typer.Option("pixel", help="pixel, or feature (checkpoints only: front and back graphs)"),
    split: Optional[int] = typer.Option(None, help="Feature space: units in the front [default: the deepest "
                                                   "split point the model was trained with]"),
    threat: Optional[str] = typer.Option(None, help="The bundle's threat [default: the trained one; 5x5 for ONNX]"),
    stride: Optional[int] = typer.Option(None, help="Mask stride [default: the trained one; required for ONNX]"),
    mask_value: float = typer.Option(0.0, help="ONNX: masked value in the normalized input (as the classifier "
                                               "was trained with masks)"),
    input_hw: Optional[str] = typer.Option(None, help="ONNX: the classifier's input size, HxW"),
    classes: Optional[Path] = typer.Option(None, help="ONNX: class names, one a line, in logit order"),
    mean: Optional[str] = typer.Option(None, help="ONNX: per-channel mean on the [0, 1] scale, e.g. '0.34 0.31 0.32'"),
    std: Optional[str] = typer.Option(None, help="ONNX: per-channel std on the [0, 1] scale"),
    data: Optional[str] = typer.Option(None, help="Accuracy check data: gtsrb:test, cifar10:test, folder:PATH "
                                                  "[default: the checkpoint's test part; required for ONNX]"),
    limit: Optional[int] = typer.Option(None, help="Measure on the first LIMIT images [default: all; 500 for ONNX]"),
    probe_trials: int = typer.Option(96, help="Feature space: random patches for the receptive-field probe"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]"),
) -> None:
    """Write a double-masking bundle: parity, the front's receptive-field probe (feature space), accuracy measured
    through the runtime."""
    foreign = {"--input-hw": input_hw, "--classes": classes, "--mean": mean, "--std": std}
    if source.suffix == ".onnx":
        missing = [k for k, v in {**foreign, "--stride": stride, "--data": data}.items() if v is None]
        if missing or space != "pixel":
            raise ExportError(f"wrapping an ONNX classifier needs {', '.join(missing) or 'pixel space'}")
        names = [n.strip() for n in classes.read_text(encoding="utf-8").splitlines() if n.strip()]
        command = " ".join(["certinfer export doublemask", str(source), str(out), f"--input-hw {input_hw}",
                            f"--classes {classes}", f"--mean '{mean}'", f"--std '{std}'", f"--threat {threat or '5x5'}",
                            f"--stride {stride}", f"--mask-value {mask_value}", f"--data {data}",
                            f"--limit {limit or 500}"])
        written = export_classifier(source, out, _hw(input_hw), names, _floats(mean, "--mean"), _floats(std, "--std"),
                                    threat or "5x5", stride, data, mask_value, limit or 500, data_dir, command)
    else:
        given = [k for k, v in foreign.items() if v is not None]
        if given:
            raise ExportError(f"{', '.join(given)}: only for an ONNX classifier (a checkpoint records its own)")
        written = export_checkpoint(source, out, space, split, threat, stride, probe_trials, data_dir, data, limit)
    typer.echo(summary(out, written))
