"""Export a trained BagCert region scorer to a verified bundle.

The graph maps normalized NCHW float32 to a uint8 (N, H', W', C) code map: bit 0 is the Heaviside
score H(z), bit 1 marks |z| < tolerance (cells a backend that is not bit-exact may get wrong; see
``runtime.defenses.bagcert``). Export checks parity with torch on real images, runs the receptive-field
probe on onnxruntime (failing the export if locality is violated) and measures accuracy through the
runtime before the bundle is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch
import typer

from certinfer.export.exporter import (cpu_session, eval_split, load_trained, manifest, onnx_engine, prepare,
                                       publish, summary)
from certinfer.export.onnx_export import export_onnx
from certinfer.export.probe import expose_input_of, probe
from certinfer.export.torch_weights import torch_engine
from certinfer.runtime.geometry import Geometry
from certinfer.threat import parse
from certinfer.train import models
from certinfer.train.bagcert import build_scorer
from certinfer.train.models.bagcert import CodeMap, RegionScorer

DEFENSE = "bagcert"
PARITY_EPS = 1e-4  # cells whose fp32 pre-activation is this close to 0 may legitimately differ between backends
PARITY_FRAMES = 256  # test images for torch parity and for every other backend against onnxruntime CPU


def load_scorer(checkpoint: Path) -> tuple[RegionScorer, dict]:
    state, meta = load_trained(checkpoint, DEFENSE)
    scorer = build_scorer(meta["num_classes"], meta["config"]["model"])
    scorer.load_state_dict(state)
    return scorer.eval(), meta


def _torch_config(meta: dict, tolerance: float) -> dict:
    return models.config("bagcert-code-map", meta["num_classes"], meta["config"]["model"], (3, *meta["input_hw"]),
                         tolerance=tolerance)


def exported_module(checkpoint: Path, bundle_manifest: dict) -> tuple[CodeMap, dict]:
    """The module a BagCert bundle's ONNX is exported from (at the bundle's tolerance), and its torch config."""
    tolerance = float(bundle_manifest["defense"]["params"]["tolerance"])
    scorer, meta = load_scorer(Path(checkpoint))
    return CodeMap(scorer, tolerance).eval(), _torch_config(meta, tolerance)


def parity(scorer: RegionScorer, session: ort.InferenceSession, x: np.ndarray) -> dict:
    """torch fp32 vs the ONNX engine on real inputs: binary maps must agree except within PARITY_EPS of 0."""
    with torch.no_grad():
        z = scorer(torch.from_numpy(x)).permute(0, 2, 3, 1).numpy()
    code, pre = session.run(["scores", "preactivation"], {"input": x})
    differ = (code & 1) != (z >= 0)
    near = np.abs(z) < PARITY_EPS
    error = float(np.abs(pre.transpose(0, 2, 3, 1) - z).max())  # the exposed pre-activation is NCHW
    report = {"images": len(x), "cells": int(z.size), "max_abs_error": error,
              "binary_disagreements": int(differ.sum()), "cells_within_eps": int(near.sum()), "eps": PARITY_EPS}
    if (differ & ~near).any():
        raise AssertionError(f"ONNX engine disagrees with torch on {int((differ & ~near).sum())} cells away from the "
                             f"threshold: {json.dumps(report)}")
    return report


def export_bagcert(checkpoint: Path, out: Path, threat: str = "5x5", tolerance: float = 0.05,
                   probe_trials: int = 96, max_batch: int = 1024, data_dir: str | None = None,
                   eval_data: str | None = None) -> dict:
    """Write a BagCert bundle to ``out``; returns its manifest."""
    scorer, meta = load_scorer(Path(checkpoint))
    hw = tuple(meta["input_hw"])
    geometry = Geometry.from_dict(meta["geometry"])
    rects = list(parse(threat, input_hw=hw).rects)  # fail early on a threat that does not fit
    test = eval_split(meta, hw, data_dir, eval_data)
    x = prepare(test.x[:PARITY_FRAMES], hw, meta["mean"], meta["std"])
    module = CodeMap(scorer, tolerance).eval()
    model = export_onnx(module, (torch.from_numpy(x[:2]),), ["input"], ["scores"])
    torch_entry, weights = torch_engine(module, _torch_config(meta, tolerance), max_batch)
    session = cpu_session(expose_input_of(model, "GreaterOrEqual"))
    parity_report = parity(scorer, session, x)
    probe_report = probe(lambda b: session.run(["preactivation"], {"input": b})[0].transpose(0, 2, 3, 1),
                         x, geometry, rects + [(1, 1)], trials=probe_trials)
    m = manifest(DEFENSE, {"condition": "3.2", "tolerance": tolerance}, hw, meta["mean"], meta["std"],
                 meta["classes"], threat, [onnx_engine(max_batch), torch_entry],
                 {"torch_vs_onnxruntime-cpu": parity_report}, meta, geometry=geometry.to_dict(),
                 probe={"backend": "onnxruntime-cpu", "op": "GreaterOrEqual", **probe_report,
                        "exact_backends": ["onnxruntime-cpu"]})
    return publish(out, m, {"model.onnx": model, "model.safetensors": weights}, test,
                   parity_frames=test.x[:PARITY_FRAMES])


cli = typer.Typer(add_completion=False)


@cli.command(DEFENSE)
def export_command(
    checkpoint: Path = typer.Argument(..., help="model.safetensors written by certinfer train bagcert"),
    out: Path = typer.Argument(..., help="Bundle folder to write"),
    threat: str = typer.Option("5x5", help="The bundle's default threat"),
    tolerance: float = typer.Option(0.05, help="|pre-activation| below which a cell is 'near the threshold'"),
    probe_trials: int = typer.Option(96, help="Random patches for the receptive-field probe"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder for parity images and the accuracy check"),
) -> None:
    """Export to ONNX, check parity and the receptive field, measure accuracy, write the bundle."""
    typer.echo(summary(out, export_bagcert(checkpoint, out, threat, tolerance, probe_trials, data_dir=data_dir)))
