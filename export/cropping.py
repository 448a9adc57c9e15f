"""Export a crop classifier (``certinfer train cropping``) to a randomized-cropping bundle.

The graph is the crop classifier: (N, 5, ch, cw) float32, the normalized crop plus its top/left offset planes
(``certinfer.runtime.defenses.cropping.cut``) -> (N, C) logits. Parity with torch is checked on crops of real
test images; then the bundle's accuracy is measured through the runtime itself (its Certifier, crops drawn from
a fixed seed so the number is reproducible) and stored in the manifest's provenance. No receptive-field probe
is needed: the runtime cuts the crops, so a crop's prediction cannot see pixels outside it on any backend. What
the certificate does rely on, a crop's logits computed from that crop alone whatever batch it runs in, is
checked bit for bit on onnxruntime CPU at the batch sizes the runtime uses (``probe.exact_backends``); other
backends count near-tie crops as changed (``defense.params.tolerance``, see the runtime's cropping module).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch
import typer

from certinfer.export.exporter import (argmax_disagreements, cpu_session, eval_split, float_parity, load_trained,
                                       manifest, onnx_engine, prepare, publish, summary)
from certinfer.export.onnx_export import export_onnx
from certinfer.export.probe import export_batch_probe
from certinfer.export.torch_weights import torch_engine
from certinfer.runtime.certifier import TIE_TOLERANCE
from certinfer.runtime.defenses.cropping import DEFAULT_THRESHOLD, MODES, crop_locations
from certinfer.threat import parse
from certinfer.train import models
from certinfer.train.cropping import TrainConfig, random_crops
from certinfer.train.models.cropping import build_cropnet

DEFENSE = "cropping"


def load_network(checkpoint: Path) -> tuple[torch.nn.Module, dict, TrainConfig]:
    state, meta = load_trained(checkpoint, DEFENSE)
    cfg = TrainConfig(**meta["config"])
    model = build_cropnet(meta["num_classes"], cfg.model)
    model.load_state_dict(state)
    return model.eval(), meta, cfg


def _torch_config(meta: dict, cfg: TrainConfig) -> dict:
    return models.config("cropnet", meta["num_classes"], cfg.model, (5, *cfg.crop_hw))


def exported_module(checkpoint: Path, bundle_manifest: dict) -> tuple[torch.nn.Module, dict]:
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
            "mode": mode, "threshold": float(threshold), "tolerance": TIE_TOLERANCE}


def parity(model: torch.nn.Module, session: ort.InferenceSession, x: np.ndarray) -> dict:
    """fp32 torch vs the ONNX engine on the same crops: relative max error below PARITY_RTOL."""
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = session.run(["logits"], {"input": x})[0]
    return float_parity(ref, got, inputs=len(x), argmax_disagreements=argmax_disagreements(ref, got))


def batch_checked(session: ort.InferenceSession, rows: np.ndarray, max_batch: int, per_frame: int) -> dict:
    """The manifest's ``probe``: every crop's logits the same bits on onnxruntime CPU in a batch of any size the
    runtime sends (``per_frame`` crops per frame, chunked to ``max_batch``), else the export fails."""
    sizes = {per_frame * k for k in (1, 2, 3) if per_frame * k < max_batch}
    report = export_batch_probe(session, rows, max_batch, sizes, "the crop classifier", "randomized cropping needs "
                                "each crop's logits computed from that crop alone (no batch statistics)")
    return {"backend": "onnxruntime-cpu", "role": "model", "batch": report, "exact_backends": ["onnxruntime-cpu"]}


def export_cropping(checkpoint: Path, out: Path, threat: str = "2.4%", crops: int = 128, replace: bool = True,
                    mode: str = "sample", threshold: float = DEFAULT_THRESHOLD, max_batch: int = 4096,
                    data_dir: str | None = None, eval_limit: int | None = 500) -> dict:
    """Write a randomized-cropping bundle to ``out``; returns its manifest."""
    model, meta, cfg = load_network(Path(checkpoint))
    hw, crop_hw = tuple(cfg.input_hw), cfg.crop_hw
    params = defense_params(crop_hw, hw, crops, replace, mode, threshold)
    parse(threat, input_hw=hw)  # fails early on a threat that does not fit
    test = eval_split(meta, hw, data_dir, limit=eval_limit)
    # crops exactly as the runtime cuts them from its prepared frames, one gather
    rows = random_crops(prepare(test.x[:64], hw, meta["mean"], meta["std"]), crop_hw, np.random.default_rng(0),
                        per_image=8)
    onnx_model = export_onnx(model, (torch.from_numpy(rows[:2]),), ["input"], ["logits"])
    torch_entry, weights = torch_engine(model, _torch_config(meta, cfg), max_batch)
    session = cpu_session(onnx_model)
    m = manifest(DEFENSE, params, hw, meta["mean"], meta["std"], meta["classes"], threat,
                 [onnx_engine(max_batch), torch_entry], {"torch_vs_onnxruntime-cpu": parity(model, session, rows)},
                 meta, probe=batch_checked(session, rows, max_batch, params["crops"]))
    return publish(out, m, {"model.onnx": onnx_model, "model.safetensors": weights}, test, metrics_batch=32)


cli = typer.Typer(add_completion=False)


@cli.command(DEFENSE)
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
    typer.echo(summary(out, export_cropping(checkpoint, out, threat, crops, replace, mode, threshold, max_batch,
                                            data_dir, eval_limit)))
