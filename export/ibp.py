"""Export an IBP network (``certinfer train ibp``) to an IBP bundle: a ``model`` graph and a ``bounds`` graph.

* ``model.onnx`` (role ``model``): normalized frames (N, 3, H, W) -> logits (N, K); gives the label.
* ``bounds.onnx`` (role ``bounds``): (N, 6, H, W), lower image channels then upper image channels -> lower bounds
  of z_i - z_j for every class pair (N, K, K) (``certinfer.train.models.ibp.IBPBounds``).
* ``model.safetensors``: the torch engine for both roles (the two modules share their state dict).

Checks before the bundle is written (export fails otherwise):
1. torch fp32 vs onnxruntime CPU for both graphs (relative error below ``exporter.PARITY_RTOL``);
2. the bounds graph on a point box (lower == upper == frame) equals the model's logit differences;
3. rounding: on real frames at every location of the threat's rectangles, the fp32 bounds (onnxruntime CPU and
   torch CPU) and the fp32 model margins differ from a float64 evaluation by at most ``tolerance / 10`` together
   (the runtime certifies only margins above ``tolerance``; see ``certinfer.runtime.defenses.ibp``). The backends
   that pass are the manifest's ``probe.exact_backends``: the only ones whose certificates the runtime trusts.
Then the bundle's accuracy is measured through the runtime and stored in the manifest's provenance.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch
import typer

from certinfer.export.exporter import (cpu_session, eval_split, float_parity, load_trained, manifest, onnx_engine,
                                       prepare, publish, summary)
from certinfer.export.onnx_export import export_onnx
from certinfer.export.torch_weights import torch_engine
from certinfer.runtime.defenses.ibp import (DEFAULT_CHUNK, DEFAULT_TOLERANCE, interval_inputs, patch_interval,
                                            patch_locations)
from certinfer.threat import parse
from certinfer.train import models
from certinfer.train.ibp import TrainConfig
from certinfer.train.models.ibp import IBPBounds, IBPNet

DEFENSE = "ibp"
ROUNDING_SHARE = 0.1  # measured float32 rounding (bounds + model) may use at most this share of the tolerance
ROUNDING_FRAMES = 4  # real frames whose boxes at every location are compared with float64


def load_network(checkpoint: Path) -> tuple[IBPNet, dict, TrainConfig]:
    state, meta = load_trained(checkpoint, DEFENSE)
    cfg = TrainConfig(**meta["config"])
    net = IBPNet(meta["num_classes"], cfg.model)
    net.load_state_dict(state)
    return net.eval(), meta, cfg


def _configs(meta: dict, cfg: TrainConfig) -> tuple[dict, dict]:
    c = int(cfg.model.get("in_channels", 3))
    shape = (c, *cfg.input_hw)
    return (models.config("ibp-logits", meta["num_classes"], cfg.model, shape),
            models.config("ibp-bounds", meta["num_classes"], cfg.model, (2 * c, *cfg.input_hw)))


def _bounds_module(net: IBPNet, config: dict, dtype=torch.float32) -> IBPBounds:
    bounds = models.build(config)
    bounds.load_state_dict(net.state_dict())
    return bounds.eval().to(dtype)


def parity(net: IBPNet, bounds: IBPBounds, sessions: dict[str, ort.InferenceSession], x: np.ndarray,
           boxes: np.ndarray) -> dict:
    """torch fp32 vs onnxruntime CPU for both graphs; the bounds graph on point boxes vs the model's differences."""
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
        margins = bounds(torch.from_numpy(boxes)).numpy()
        point = bounds(torch.from_numpy(np.concatenate([x, x], axis=1))).numpy()
    got_logits = sessions["model"].run(None, {"input": x})[0]
    got_margins = sessions["bounds"].run(None, {"input": boxes})[0]
    report = {name: float_parity(ref, got, f"ONNX {name} graph", inputs=len(ref))
              for name, ref, got in (("model", logits, got_logits), ("bounds", margins, got_margins))}
    report["point_boxes_vs_logit_differences"] = float_parity(
        logits[:, :, None] - logits[:, None, :], point, "the bounds graph on point boxes (vs the logit differences)")
    return report


def rounding_check(net: IBPNet, config: dict, sessions: dict[str, ort.InferenceSession], x: np.ndarray,
                   rects, mean, std, tolerance: float) -> dict:
    """float32 rounding of the bounds (onnxruntime CPU, torch CPU) and of the model margins vs float64.

    Boxes: every location of every rectangle on the frames ``x``. A backend passes when its bounds error plus the
    model's margin error stays within ROUNDING_SHARE of the tolerance; returns the errors and the passing backends.
    """
    lo, hi = patch_interval(mean, std)
    bounds32, bounds64 = _bounds_module(net, config), _bounds_module(net, config, torch.float64)
    net64 = IBPNet(net.layers[-1].out_features, config["model"])
    net64.load_state_dict(net.state_dict())
    net64 = net64.eval().double()
    with torch.no_grad():
        z32 = sessions["model"].run(None, {"input": x})[0].astype(np.float64)
        z64 = net64(torch.from_numpy(x).double()).numpy()
    model_error = float(np.abs((z32[:, :, None] - z32[:, None, :]) - (z64[:, :, None] - z64[:, None, :])).max())
    errors = {"onnxruntime-cpu": 0.0, "torch-cpu": 0.0}
    for rect in rects:
        corners = patch_locations(tuple(x.shape[2:]), rect)
        for frame in x:
            boxes = interval_inputs(np.repeat(frame[None], len(corners), axis=0), rect, corners, lo, hi)
            with torch.no_grad():
                ref = bounds64(torch.from_numpy(boxes).double()).numpy()
                got = {"onnxruntime-cpu": sessions["bounds"].run(None, {"input": boxes})[0],
                       "torch-cpu": bounds32(torch.from_numpy(boxes)).numpy()}
            for name, g in got.items():
                errors[name] = max(errors[name], float(np.abs(g.astype(np.float64) - ref).max()))
    budget = ROUNDING_SHARE * tolerance
    verified = [name for name, e in errors.items() if e + model_error <= budget]
    report = {"frames": len(x), "rects": [f"{h}x{w}" for h, w in rects], "model_margin_error": model_error,
              "bounds_error": errors, "budget": budget, "verified_backends": verified}
    if "onnxruntime-cpu" not in verified:
        raise AssertionError(f"float32 rounding exceeds {ROUNDING_SHARE} x tolerance: {json.dumps(report)}")
    return report


def export_ibp(checkpoint: Path, out: Path, threat: str = "2x2", tolerance: float = DEFAULT_TOLERANCE,
               chunk: int = DEFAULT_CHUNK, max_batch: int = 4096, data_dir: str | None = None,
               eval_limit: int | None = 200) -> dict:
    """Write an IBP bundle to ``out``; returns its manifest."""
    net, meta, cfg = load_network(Path(checkpoint))
    hw = tuple(cfg.input_hw)
    rects = parse(threat, input_hw=hw).rects  # fails early on a threat that does not fit
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    logits_config, bounds_config = _configs(meta, cfg)
    bounds = _bounds_module(net, bounds_config)
    test = eval_split(meta, hw, data_dir, limit=eval_limit)
    x = prepare(test.x[:64], hw, meta["mean"], meta["std"])
    lo, hi = patch_interval(meta["mean"], meta["std"])
    corners = patch_locations(hw, rects[0])
    boxes = interval_inputs(x, rects[0], corners[np.random.default_rng(0).integers(0, len(corners), len(x))], lo, hi)
    onnx_model = export_onnx(net, (torch.from_numpy(x[:2]),), ["input"], ["logits"])
    with warnings.catch_warnings():  # the class-pair indices are numpy constants on purpose
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        onnx_bounds = export_onnx(bounds, (torch.from_numpy(boxes[:2]),), ["input"], ["margins"])
    sessions = {"model": cpu_session(onnx_model), "bounds": cpu_session(onnx_bounds)}
    report = parity(net, bounds, sessions, x, boxes)
    rounding = rounding_check(net, bounds_config, sessions, x[:ROUNDING_FRAMES], rects, meta["mean"], meta["std"],
                              tolerance)
    model_entry, weights = torch_engine(net, logits_config, max_batch)
    bounds_entry = {**model_entry, "role": "bounds", "config": bounds_config}
    params = {"tolerance": float(tolerance), "chunk": int(chunk), "trained_patch": f"{cfg.patch}x{cfg.patch}",
              "strategy": cfg.strategy}
    m = manifest(DEFENSE, params, hw, meta["mean"], meta["std"], meta["classes"], threat,
                 [onnx_engine(max_batch), onnx_engine(max_batch, "bounds.onnx", "bounds"), model_entry, bounds_entry],
                 {"torch_vs_onnxruntime-cpu": report, "rounding_vs_float64": rounding}, meta,
                 probe={"exact_backends": rounding["verified_backends"]})
    files = {"model.onnx": onnx_model, "bounds.onnx": onnx_bounds, "model.safetensors": weights}
    return publish(out, m, files, test, metrics_batch=16)


cli = typer.Typer(add_completion=False)


@cli.command(DEFENSE)
def export_command(
    checkpoint: Path = typer.Argument(..., help="model.safetensors written by certinfer train ibp"),
    out: Path = typer.Argument(..., help="Bundle folder to write"),
    threat: str = typer.Option("2x2", help="The bundle's default threat"),
    tolerance: float = typer.Option(DEFAULT_TOLERANCE, help="Certify only lower margins above this (logit units)"),
    chunk: int = typer.Option(DEFAULT_CHUNK, min=1, help="Patch boxes per bounds-engine call"),
    max_batch: int = typer.Option(4096, help="The engines' largest batch"),
    eval_limit: Optional[int] = typer.Option(200, help="Measure accuracy on the first N test images"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder for parity frames and the accuracy check"),
) -> None:
    """Export both graphs to ONNX, check parity and rounding, measure accuracy through the runtime, write the bundle."""
    typer.echo(summary(out, export_ibp(checkpoint, out, threat, tolerance, chunk, max_batch, data_dir, eval_limit)))
