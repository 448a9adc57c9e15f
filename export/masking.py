"""Export a PatchGuard network (``certinfer train masking``) to a verified robust-masking bundle.

* BagNet checkpoint (``source: local-logits``; variants Mask-BN, CBN): the graph maps the normalized NCHW
  frame to float32 local logits (N, H', W', C). The receptive-field probe runs on onnxruntime and must find
  every output outside ``Geometry.affected`` bit-identical, or the export fails.
* DRS checkpoint (``source: ablation``; variants Mask-DS, DRS): the graph is the base classifier, (N, 4, H, W)
  image in [0, 1] + keep mask -> float32 (N, C) logits. The ablation probe runs on onnxruntime and must find
  the outputs bit-identical when ablated pixels change (and changed when kept pixels do), or the export fails.

Both check parity with torch on real test images, then the bundle's accuracy is measured through the runtime
itself (its Certifier) and stored in the manifest's provenance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort
import torch
import typer

from certinfer.export.exporter import (argmax_disagreements, cpu_session, eval_split, float_parity, load_trained,
                                       manifest, onnx_engine, prepare, publish, summary)
from certinfer.export.onnx_export import export_onnx
from certinfer.export.probe import ProbeError, bits, probe
from certinfer.export.torch_weights import torch_engine
from certinfer.runtime import ablation
from certinfer.runtime.defenses.masking import TANH, VARIANTS
from certinfer.runtime.geometry import Geometry
from certinfer.threat import parse
from certinfer.train import models
from certinfer.train.masking import TrainConfig, build
from certinfer.train.models.bagnet import LocalLogits

DEFENSE = "masking"
SOURCE = {"mask-bn": "local-logits", "cbn": "local-logits", "mask-ds": "ablation", "drs": "ablation"}
NETWORK_SOURCE = {"bagnet": "local-logits", "drs": "ablation"}
DEFAULT_VARIANT = {"bagnet": "mask-bn", "drs": "mask-ds"}
FEATURES = ("logits", "confidence", "prediction")


def load_network(checkpoint: Path) -> tuple[torch.nn.Module, dict, TrainConfig]:
    state, meta = load_trained(checkpoint, DEFENSE)
    cfg = TrainConfig(**meta["config"])
    model = build(cfg, meta["num_classes"])
    model.load_state_dict(state)
    return model.eval(), meta, cfg


def _torch_config(meta: dict, cfg: TrainConfig) -> dict:
    if cfg.network == "bagnet":
        return models.config("bagnet-local-logits", meta["num_classes"], cfg.model, (3, *cfg.input_hw))
    return models.config("drs", meta["num_classes"], cfg.model, (4, *cfg.input_hw))


def exported_module(checkpoint: Path, bundle_manifest: dict) -> tuple[torch.nn.Module, dict]:
    """The module a masking bundle's ONNX is exported from (BagNet under LocalLogits, or the DRS base
    classifier), and its torch engine config."""
    model, meta, cfg = load_network(Path(checkpoint))
    return (LocalLogits(model) if cfg.network == "bagnet" else model).eval(), _torch_config(meta, cfg)


def parse_clip(spec: str) -> list | str:
    """``"tanh"``, or ``"lo,hi"`` with hi ``inf``/``none`` for no upper bound -> the manifest's clip value."""
    if spec.strip().lower() == TANH:
        return TANH
    try:
        lo, hi = (v.strip().lower() for v in spec.split(","))
        return [float(lo), None if hi in ("inf", "none", "") else float(hi)]
    except ValueError:
        raise ValueError(f"clip {spec!r}: use tanh or lo,hi (hi may be inf)") from None


def defense_params(variant: str, network: str, ablation_cfg: dict | None = None, feature: str | None = None,
                   threshold: float | None = None, clip: list | str | None = None,
                   abstain: float | None = None) -> dict:
    """The manifest's ``defense.params``: the variant's defaults (``masking.VARIANTS``) with overrides."""
    if variant not in SOURCE:
        raise ValueError(f"variant {variant!r}: choose from {sorted(SOURCE)}")
    if SOURCE[variant] != NETWORK_SOURCE[network]:
        fits = [v for v in SOURCE if SOURCE[v] == NETWORK_SOURCE[network]]
        raise ValueError(f"variant {variant} needs a {SOURCE[variant]} network; this checkpoint is {network} "
                         f"(use {' or '.join(fits)})")
    params = {"variant": variant, "source": SOURCE[variant], **json.loads(json.dumps(VARIANTS[variant]))}
    for key, value in (("feature", feature), ("threshold", threshold), ("clip", clip), ("abstain", abstain)):
        if value is not None:
            params[key] = value
    if params["feature"] not in FEATURES:
        raise ValueError(f"feature {params['feature']!r}: choose from {FEATURES}")
    params["threshold"] = float(params["threshold"])
    if not 0.0 <= params["threshold"] <= 1.0:
        raise ValueError(f"threshold {params['threshold']} must lie in [0, 1]")
    if params["feature"] == "prediction":
        params["abstain"] = float(params.get("abstain", 0.0))
    elif abstain is not None:
        raise ValueError("abstain applies to the prediction feature only")
    else:
        params.pop("abstain", None)
    if params["source"] == "ablation":
        params["ablation"] = dict(ablation_cfg)
    return params


def parity(model: torch.nn.Module, session: ort.InferenceSession, x: np.ndarray, output: str) -> dict:
    """fp32 torch vs the ONNX engine on the same inputs: relative max error below PARITY_RTOL, same argmax."""
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = session.run([output], {"input": x})[0]
    return float_parity(ref, got, inputs=len(x), outputs=int(ref.size),
                        argmax_disagreements=argmax_disagreements(ref, got))


def ablation_probe(run, images01: np.ndarray, geometry: Geometry, trials: int = 64, batch: int = 8,
                   seed: int = 0) -> dict:
    """On the real engine: new values for ablated pixels leave the logits bit-identical; the batch a row runs in
    does not matter. Kept pixels changed must change something (else the probe would prove nothing)."""
    rng = np.random.default_rng(seed)
    keep = ablation.masks(geometry)
    checked = kept_changed = 0
    for t in range(0, trials, batch):
        k = min(batch, trials - t)
        img = images01[rng.integers(len(images01))]
        rows = []
        for _ in range(k):
            m = keep[rng.integers(len(keep))]
            noise = rng.uniform(0, 1, size=img.shape).astype(np.float32)
            base = np.concatenate([img, m[None]])
            ablated = np.concatenate([np.where(m[None] > 0, img, noise), m[None]])  # only ablated pixels differ
            kept = np.concatenate([np.where(m[None] > 0, noise, img), m[None]])  # only kept pixels differ
            rows += [base, ablated, kept]
        out = bits(run(np.stack(rows).astype(np.float32)))
        if not np.array_equal(out[0], bits(run(rows[0][None].astype(np.float32)))[0]):
            raise ProbeError("engine outputs depend on the batch a row runs in: not bit-exact")
        for i in range(k):
            if not np.array_equal(out[3 * i], out[3 * i + 1]):
                raise ProbeError("the base classifier's output changed when only ablated pixels changed: "
                                 "an ablated pixel leaks into the logits")
            kept_changed += int(not np.array_equal(out[3 * i], out[3 * i + 2]))
            checked += 1
    if kept_changed == 0:
        raise ProbeError("changing kept pixels never changed the output: the probe cannot see the input")
    return {"kind": "ablation", "trials": checked, "bit_exact": True, "batch_invariant": True,
            "kept_pixel_changes_that_changed_outputs": kept_changed}


def _local_logits(model, x: np.ndarray, geometry: Geometry, rects: list, trials: int):
    """BagNet: the LocalLogits graph, its parity and its receptive-field probe."""
    wrapper, output = LocalLogits(model).eval(), "local_logits"
    graph = export_onnx(wrapper, (torch.from_numpy(x[:2]),), ["input"], [output])
    session = cpu_session(graph)
    probe_report = {"backend": "onnxruntime-cpu", "kind": "local-logits",
                    **probe(lambda b: session.run([output], {"input": b})[0], x, geometry, rects, trials=trials)}
    if sum(n.op_type == "Transpose" for n in onnx.load_from_string(graph).graph.node) == 1:
        probe_report["op"] = "Transpose"  # inspect --probe also reads the NCHW input of the single Transpose
    return wrapper, graph, parity(wrapper, session, x, output), probe_report


def _ablation(model, x01: np.ndarray, geometry: Geometry, trials: int):
    """DRS: the base classifier's graph, its parity on ablated rows and the ablation probe."""
    rows = ablation.batch(x01[:8], geometry)
    graph = export_onnx(model, (torch.from_numpy(rows[:2]),), ["input"], ["logits"])
    session = cpu_session(graph)
    probe_report = {"backend": "onnxruntime-cpu",
                    **ablation_probe(lambda b: session.run(["logits"], {"input": b})[0], x01, geometry, trials=trials)}
    return model, graph, parity(model, session, rows, "logits"), probe_report


def export_masking(checkpoint: Path, out: Path, variant: str | None = None, threat: str = "5x5",
                   feature: str | None = None, threshold: float | None = None, clip: list | str | None = None,
                   abstain: float | None = None, probe_trials: int = 96, max_batch: int = 1024,
                   data_dir: str | None = None, eval_data: str | None = None, eval_limit: int | None = None) -> dict:
    """Write a robust-masking bundle to ``out``; returns its manifest."""
    model, meta, cfg = load_network(Path(checkpoint))
    variant = variant or DEFAULT_VARIANT[cfg.network]
    params = defense_params(variant, cfg.network, meta.get("ablation"), feature, threshold, clip, abstain)
    hw = tuple(cfg.input_hw)
    geometry = Geometry.from_dict(meta["geometry"])
    rects = list(parse(threat, input_hw=hw).rects)  # fails early on a threat that does not fit
    test = eval_split(meta, hw, data_dir, eval_data, eval_limit)
    if cfg.network == "bagnet":  # the checkpoint's normalization, written to the manifest as is
        mean, std = meta["mean"], meta["std"]
        x = prepare(test.x[:256], hw, mean, std)
        wrapper, graph, parity_report, probe_report = _local_logits(model, x, geometry, rects + [(1, 1)],
                                                                    probe_trials)
    else:  # the base classifier takes [0, 1] pixels
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        x01 = prepare(test.x[:256], hw, mean, std)
        wrapper, graph, parity_report, probe_report = _ablation(model, x01, geometry, probe_trials)
    probe_report["exact_backends"] = ["onnxruntime-cpu"]
    torch_entry, weights = torch_engine(wrapper, _torch_config(meta, cfg), max_batch)
    m = manifest(DEFENSE, params, hw, mean, std, meta["classes"], threat, [onnx_engine(max_batch), torch_entry],
                 {"torch_vs_onnxruntime-cpu": parity_report}, meta, geometry=geometry.to_dict(), probe=probe_report,
                 provenance_extra={"network": cfg.network})
    return publish(out, m, {"model.onnx": graph, "model.safetensors": weights}, test)


cli = typer.Typer(add_completion=False)


@cli.command(DEFENSE)
def export_command(
    checkpoint: Path = typer.Argument(..., help="model.safetensors written by certinfer train masking"),
    out: Path = typer.Argument(..., help="Bundle folder to write"),
    variant: Optional[str] = typer.Option(None, help="mask-bn or cbn (BagNet), mask-ds or drs (DRS) "
                                                     "[default: mask-bn / mask-ds]"),
    threat: str = typer.Option("5x5", help="The bundle's default threat"),
    feature: Optional[str] = typer.Option(None, help="Override: logits, confidence or prediction"),
    threshold: Optional[float] = typer.Option(None, help="Override: detection threshold T in [0, 1]"),
    clip: Optional[str] = typer.Option(None, help="Override: lo,hi (hi may be inf) or tanh"),
    abstain: Optional[float] = typer.Option(None, help="Override (prediction feature): abstain below this confidence"),
    probe_trials: int = typer.Option(96, help="Random patches (or ablations) for the locality probe"),
    max_batch: int = typer.Option(1024, help="The engine's largest batch (ablations are chunked to it)"),
    eval_limit: Optional[int] = typer.Option(None, help="Measure accuracy on the first N test images only"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder for parity images and the accuracy check"),
) -> None:
    """Export to ONNX, check parity and locality, measure accuracy through the runtime, write the bundle."""
    written = export_masking(checkpoint, out, variant, threat, feature, threshold,
                             parse_clip(clip) if clip is not None else None, abstain, probe_trials, max_batch,
                             data_dir=data_dir, eval_limit=eval_limit)
    typer.echo(summary(out, written))
