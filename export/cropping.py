"""Export a crop classifier (``certinfer train cropping``) to a randomized-cropping bundle.

The graph is the crop classifier: (N, 5, ch, cw) float32, the normalized crop plus its top/left offset planes
(``certinfer.runtime.defenses.cropping.cut``) -> (N, C) logits. Parity with torch is checked on crops of real
test images; then the bundle's accuracy is measured through the runtime itself (``certinfer.load`` +
``evaluate_certifier``, crops drawn from a fixed seed so the number is reproducible) and stored in the
manifest's provenance. No receptive-field probe is needed: the runtime cuts the crops, so a crop's prediction
cannot see pixels outside it on any backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch
import typer

from certinfer.export.bundle_writer import write_bundle
from certinfer.export.onnx_export import export_onnx
from certinfer.export.torch_weights import torch_engine
from certinfer.runtime.certifier import resize
from certinfer.runtime.defenses.cropping import DEFAULT_THRESHOLD, MODES, crop_locations
from certinfer.threat import parse
from certinfer.train import data as datasets
from certinfer.train.cropping import TrainConfig, normalized, random_crops
from certinfer.train import models
from certinfer.train.loop import load_checkpoint
from certinfer.train.models.cropnet import build_cropnet

PARITY_RTOL = 1e-4  # fp32 torch vs fp32 onnxruntime: max |difference| / max(1, max |output|)
METRICS_SEED = 0  # crops of the export-time accuracy check (reproducible; never a deployment setting)


def load_network(checkpoint: Path) -> tuple[torch.nn.Module, dict, TrainConfig]:
    state, meta = load_checkpoint(Path(checkpoint))
    if meta.get("defense") != "cropping":
        raise ValueError(f"{checkpoint}: not a randomized-cropping checkpoint (defense {meta.get('defense')!r})")
    cfg = TrainConfig(**meta["config"])
    model = build_cropnet(meta["num_classes"], cfg.model)
    model.load_state_dict(state)
    return model.eval(), meta, cfg


def _torch_config(meta: dict, cfg: TrainConfig) -> dict:
    return models.config("cropnet", meta["num_classes"], cfg.model, (5, *cfg.crop_hw))


def exported_module(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """The crop classifier a cropping bundle's ONNX is exported from, and its torch engine config."""
    model, meta, cfg = load_network(Path(checkpoint))
    return model, _torch_config(meta, cfg)


def defense_params(crop_hw: tuple[int, int], input_hw: tuple[int, int], crops: int, replace: bool, mode: str,
                   threshold: float) -> dict:
    """The manifest's ``defense.params``, checked the way the certifier will read them."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {MODES}")
    total = crop_locations(input_hw, crop_hw)
    if not replace and crops > total:
        raise ValueError(f"{crops} crops without replacement: only {total} crop locations")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold {threshold} must lie in (0, 1]")
    return {"crop": list(crop_hw), "crops": total if mode == "exhaustive" else int(crops), "replace": bool(replace),
            "mode": mode, "threshold": float(threshold)}


def parity(model: torch.nn.Module, session: ort.InferenceSession, x: np.ndarray) -> dict:
    """fp32 torch vs the ONNX engine on the same crops: relative max error below PARITY_RTOL."""
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = session.run(["logits"], {"input": x})[0]
    scale = max(1.0, float(np.abs(ref).max()))
    error = float(np.abs(got - ref).max())
    report = {"inputs": len(x), "max_abs_error": error, "scale": scale, "rtol": PARITY_RTOL,
              "argmax_disagreements": int((ref.argmax(1) != got.argmax(1)).sum())}
    if error > PARITY_RTOL * scale:
        raise AssertionError(f"ONNX engine disagrees with torch: {json.dumps(report)}")
    return report


def _runtime_metrics(bundle_dir: Path, split: datasets.Split, threat: str) -> dict:
    """Accuracy measured through the runtime (bundle loaded and verified, onnxruntime CPU engine)."""
    from certinfer.runtime.evaluate import evaluate_certifier
    import certinfer

    cert = certinfer.load(bundle_dir, backend="onnxruntime-cpu", threat=threat)
    cert.fix_seed(METRICS_SEED)
    result = evaluate_certifier(cert, split.x, split.y, batch=32)
    return {**result, "data": split.name, "data_note": split.note, "crop_seed": METRICS_SEED}


def _test_images(meta: dict, cfg: TrainConfig, data_dir: str | None, eval_limit: int | None) -> datasets.Split:
    test = datasets.load(meta["dataset"]["test"], data_dir, tuple(cfg.input_hw))
    if eval_limit and eval_limit < len(test.y):
        test = datasets.Split(test.x[:eval_limit], test.y[:eval_limit], test.classes, test.name,
                              f"{test.note + '; ' if test.note else ''}first {eval_limit} images")
    return test


def export_cropping(checkpoint: Path, out: Path, threat: str = "2.4%", crops: int = 128, replace: bool = True,
                    mode: str = "sample", threshold: float = DEFAULT_THRESHOLD, max_batch: int = 4096,
                    data_dir: str | None = None, eval_limit: int | None = 500) -> dict:
    """Write a randomized-cropping bundle to ``out``; returns its manifest."""
    model, meta, cfg = load_network(Path(checkpoint))
    hw, crop_hw = tuple(cfg.input_hw), cfg.crop_hw
    params = defense_params(crop_hw, hw, crops, replace, mode, threshold)
    parse(threat, input_hw=hw)  # fails early on a threat that does not fit
    test = _test_images(meta, cfg, data_dir, eval_limit)
    # crops exactly as the runtime cuts them: bilinear resize to the input size, /255, normalized, one gather
    x = normalized(resize(test.x[:64], hw).transpose(0, 3, 1, 2), meta["mean"], meta["std"])
    rows = random_crops(x, crop_hw, np.random.default_rng(0), per_image=8)
    onnx_model = export_onnx(model, (torch.from_numpy(rows[:2]),), ["input"], ["logits"])
    session = ort.InferenceSession(onnx_model, providers=["CPUExecutionProvider"])
    torch_entry, weights = torch_engine(model, _torch_config(meta, cfg), max_batch)
    files = {"model.onnx": onnx_model, "model.safetensors": weights}
    manifest = {
        "schema": 1,
        "defense": {"kind": "cropping", "params": params},
        "input": {"hw": list(hw), "channels": 3, "mean": [float(v) for v in meta["mean"]],
                  "std": [float(v) for v in meta["std"]], "classes": meta["classes"], "resize": "bilinear"},
        "threat": threat,
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "role": "model",
                     "batch": [1, max_batch]}, torch_entry],
        "parity": {"torch_vs_onnxruntime-cpu": parity(model, session, rows)},
        "provenance": {k: meta.get(k) for k in ("preset", "command", "config", "dataset", "seed", "commit")}
                      | {"train_metrics": meta.get("metrics", {})},
    }
    write_bundle(out, manifest, files)
    manifest["provenance"]["metrics"] = _runtime_metrics(Path(out), test, threat)
    write_bundle(out, manifest, files)
    return manifest


cli = typer.Typer(add_completion=False)


@cli.command("cropping")
def export_command(
    checkpoint: Path = typer.Argument(..., help="model.safetensors written by certinfer train cropping"),
    out: Path = typer.Argument(..., help="Bundle folder to write"),
    threat: str = typer.Option("2.4%", help="The bundle's default threat"),
    crops: int = typer.Option(128, min=1, help="Crops per frame (sample mode)"),
    replace: bool = typer.Option(True, "--replace/--no-replace", help="Draw crop locations with replacement"),
    mode: str = typer.Option("sample", help="sample (random crops, probabilistic certificate) or exhaustive "
                                            "(every crop location once, deterministic certificate)"),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, help="Certified when p_c >= this"),
    max_batch: int = typer.Option(4096, help="The engine's largest batch (crops are chunked to it)"),
    eval_limit: Optional[int] = typer.Option(500, help="Measure accuracy on the first N test images"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder for parity crops and the accuracy check"),
) -> None:
    """Export to ONNX, check parity, measure accuracy through the runtime, write the bundle."""
    manifest = export_cropping(checkpoint, out, threat, crops, replace, mode, threshold, max_batch, data_dir,
                               eval_limit)
    m = manifest["provenance"]["metrics"]
    typer.echo(json.dumps({"bundle": str(out), "defense": manifest["defense"]["params"],
                           "clean": m["clean_accuracy"], "certified": m["certified_accuracy"]}))
