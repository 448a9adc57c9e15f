"""Export a ScaleCert network (``certinfer train scalecert``) to a verified certified-detection bundle.

The graph is the whole SIN network: (N, 4, H, W) float32, the normalized frame plus its occlusion mask ->
logits (N, C) and winners (N, H, W). Checks before the bundle is written:

* parity with torch (logits within PARITY_RTOL, winner masks equal) on real test images, with and without
  occlusion windows;
* receptive-field probe of the superficial layer on onnxruntime CPU: the graph's superficial features (the input of
  its single ReduceSum, the SIN channel sum) must stay bit-identical outside ``Geometry.affected`` of random
  patches that change the frame AND the mask channel, and must not depend on the batch;
* batch independence of the whole graph's outputs (a frame's logits and winners do not depend on its batch) at
  the batch sizes the runtime runs, up to the engine's largest (``probe.batch_probe``);
* the soundness argument's step (A) on the real graph: every window of the threat's family that misses R(x)
  leaves the logits and winners bit-identical.

Then the bundle's accuracy is measured through the runtime itself (its Certifier). ``certinfer inspect --probe``
checks locality and batch independence again on the bundle's own engines, on every backend here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch
import typer

from certinfer.export.exporter import (argmax_disagreements, cpu_session, eval_split, float_parity, load_trained,
                                       manifest, onnx_engine, prepare, publish, summary)
from certinfer.export.onnx_export import export_onnx
from certinfer.export.probe import ProbeError, batch_probe, bits, expose_input_of, probe
from certinfer.export.torch_weights import torch_engine
from certinfer.runtime.defenses.scalecert import family, group_size, meets_region, window_side
from certinfer.runtime.geometry import Geometry
from certinfer.threat import parse
from certinfer.train import models
from certinfer.train.models.scalecert import SINNet, build_scalecert
from certinfer.train.scalecert import TrainConfig

DEFENSE = "scalecert"
SUPERFICIAL_OP = "ReduceSum"  # the SIN layer's channel sum: its input is the superficial feature map


def load_network(checkpoint: Path) -> tuple[SINNet, dict, TrainConfig]:
    state, meta = load_trained(checkpoint, DEFENSE)
    cfg = TrainConfig(**meta["config"])
    model = build_scalecert(meta["num_classes"], cfg.model)
    model.load_state_dict(state)
    model.sparse = True
    return model.eval(), meta, cfg


def _torch_config(meta: dict, cfg: TrainConfig) -> dict:
    return models.config("scalecert", meta["num_classes"], cfg.model, (4, *cfg.input_hw))


def exported_module(checkpoint: Path, bundle_manifest: dict) -> tuple[torch.nn.Module, dict]:
    """The SIN network a ScaleCert bundle's ONNX is exported from, and its torch engine config."""
    model, meta, cfg = load_network(Path(checkpoint))
    return model, _torch_config(meta, cfg)


def defense_params(r: int, tau: float, model: SINNet) -> dict:
    """The manifest's ``defense.params``, checked the way the certifier reads them."""
    group_size(window_side(1, r, min(model.cfg.input_hw)), tau)
    return {"r": int(r), "tau": float(tau), "top_k": float(model.cfg.top_k), "winners": int(model.cfg.winners),
            "fill": 0.0, "engine_input": "normalized frame (C channels) + occlusion mask (1 channel, 1 = occluded)"}


def _rows(x: np.ndarray, masks: np.ndarray) -> np.ndarray:
    return np.concatenate([x, masks[:, None]], axis=1).astype(np.float32)


def parity(model: SINNet, session: ort.InferenceSession, rows: np.ndarray) -> dict:
    """fp32 torch vs the ONNX engine on the same rows: logits within PARITY_RTOL, winner masks identical."""
    with torch.no_grad():
        ref, ref_keep = (t.numpy() for t in model(torch.from_numpy(rows)))
    got, keep = session.run(["logits", "keep"], {"input": rows})
    report = float_parity(ref, got, inputs=len(rows), argmax_disagreements=argmax_disagreements(ref, got),
                          winner_mismatches=int((ref_keep != keep).sum()))
    if report["winner_mismatches"]:
        raise AssertionError(f"ONNX engine's winner masks disagree with torch: {json.dumps(report)}")
    return report


def outside_region_check(session: ort.InferenceSession, x: np.ndarray, geometry: Geometry, windows) -> dict:
    """Step (A) on the real graph: occluding a family window that misses R(x) changes no output bit."""
    hw = x.shape[2:]
    logits0, keep = session.run(["logits", "keep"], {"input": _rows(x, np.zeros((len(x), *hw), np.float32))})
    n, w = np.nonzero(~meets_region(keep, windows, geometry))
    if len(n):
        z, k = session.run(["logits", "keep"], {"input": _rows(x[n], windows.masks[w])})
        if not (np.array_equal(bits(z), bits(logits0[n])) and np.array_equal(k, keep[n])):
            raise ProbeError("occluding a window outside the candidate region changed the outputs")
    return {"frames": len(x), "windows_outside_region": int(len(n)), "bit_identical": True}


def superficial_probe(onnx_model: bytes, rows: np.ndarray, geometry: Geometry, rects: list, trials: int) -> dict:
    """The receptive-field probe on the superficial features of the real graph (frame and mask channels patched)."""
    session = cpu_session(expose_input_of(onnx_model, SUPERFICIAL_OP, "superficial"))
    run = lambda b: session.run(["superficial"], {"input": b})[0].transpose(0, 2, 3, 1)  # noqa: E731
    return {"op": SUPERFICIAL_OP, **probe(run, rows, geometry, rects, trials=trials)}


def export_scalecert(checkpoint: Path, out: Path, threat: str = "2.4%", r: int | None = None,
                     tau: float | None = None, probe_trials: int = 96, max_batch: int = 1024,
                     data_dir: str | None = None, eval_limit: int | None = 500) -> dict:
    """Write a ScaleCert bundle to ``out``; returns its manifest. ``r`` and ``tau`` default to the training's."""
    model, meta, cfg = load_network(Path(checkpoint))
    r, tau = cfg.r if r is None else r, cfg.tau if tau is None else tau
    params = defense_params(r, tau, model)
    hw = tuple(cfg.input_hw)
    geometry = Geometry.from_dict(meta["geometry"])
    rects = list(parse(threat, input_hw=hw).rects)  # fails early on a threat that does not fit
    test = eval_split(meta, hw, data_dir, limit=eval_limit)
    # frames exactly as the runtime prepares them, unoccluded and under the threat's own windows
    x = prepare(test.x[:64], hw, meta["mean"], meta["std"])
    windows = family(hw, tuple(rects[0]), r, tau)
    pick = np.random.default_rng(0).integers(0, windows.size, len(x))
    rows = np.concatenate([_rows(x, np.zeros((len(x), *hw), np.float32)), _rows(x, windows.masks[pick])])
    onnx_model = export_onnx(model, (torch.from_numpy(rows[:2]),), ["input"], ["logits", "keep"])
    session = cpu_session(onnx_model)
    probe_report = {"backend": "onnxruntime-cpu",
                    **superficial_probe(onnx_model, rows, geometry, rects + [(1, 1)], probe_trials),
                    "outputs": batch_probe(lambda b: tuple(session.run(["logits", "keep"], {"input": b})), rows,
                                           max_batch),
                    "outside_region": outside_region_check(session, x, geometry, windows),
                    "exact_backends": ["onnxruntime-cpu"]}
    torch_entry, weights = torch_engine(model, _torch_config(meta, cfg), max_batch)
    m = manifest(DEFENSE, params, hw, meta["mean"], meta["std"], meta["classes"], threat,
                 [onnx_engine(max_batch), torch_entry],
                 {"torch_vs_onnxruntime-cpu": parity(model, session, rows)}, meta,
                 geometry=geometry.to_dict(), probe=probe_report)
    return publish(out, m, {"model.onnx": onnx_model, "model.safetensors": weights}, test, metrics_batch=32)


cli = typer.Typer(add_completion=False)


@cli.command(DEFENSE)
def export_command(
    checkpoint: Path = typer.Argument(..., help="model.safetensors written by certinfer train scalecert"),
    out: Path = typer.Argument(..., help="Bundle folder to write"),
    threat: str = typer.Option("2.4%", help="The bundle's default threat"),
    r: Optional[int] = typer.Option(None, help="Window side = patch + r - 1 [default: the training's, 3]"),
    tau: Optional[float] = typer.Option(None, help="Window merge overlap ratio [default: the training's, 0.3]"),
    probe_trials: int = typer.Option(96, help="Random patches for the superficial layer's locality probe"),
    max_batch: int = typer.Option(1024, help="The engine's largest batch (occluded copies are chunked to it)"),
    eval_limit: Optional[int] = typer.Option(500, help="Measure accuracy on the first N test images"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder for parity images and the accuracy check"),
) -> None:
    """Export to ONNX, check parity and locality, measure accuracy through the runtime, write the bundle."""
    typer.echo(summary(out, export_scalecert(checkpoint, out, threat, r, tau, probe_trials, max_batch, data_dir,
                                             eval_limit)))
