"""Export a PatchGuard network (``certinfer train patchguard``) to a verified robust-masking bundle.

* BagNet checkpoint (``source: local-logits``; variants Mask-BN, CBN): the graph maps the normalized NCHW
  frame to float32 local logits (N, H', W', C). The receptive-field probe runs on onnxruntime and must find
  every output outside ``Geometry.affected`` bit-identical, or the export fails.
* DRS checkpoint (``source: ablation``; variants Mask-DS, DRS): the graph is the base classifier, (N, 4, H, W)
  image in [0, 1] + keep mask -> float32 (N, C) logits. The ablation probe runs on onnxruntime and must find
  the outputs bit-identical when ablated pixels change (and changed when kept pixels do), or the export fails.

Both check parity with torch on real test images, then the bundle's accuracy is measured through the runtime
itself (``certinfer.load`` + ``evaluate_certifier``) and stored in the manifest's provenance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch
import typer

from certinfer.export.bundle_writer import runtime_metrics, write_bundle
from certinfer.export.onnx_export import export_onnx
from certinfer.export.probe import ProbeError, _bits, probe
from certinfer.export.torch_weights import torch_engine
from certinfer.runtime import ablation
from certinfer.runtime.certifier import resize
from certinfer.runtime.defenses.masking import TANH, VARIANTS
from certinfer.runtime.geometry import Geometry
from certinfer.threat import parse
from certinfer.train import data as datasets
from certinfer.train import models
from certinfer.train.loop import load_checkpoint
from certinfer.train.models.bagnet import LocalLogits
from certinfer.train.patchguard import TrainConfig, build

SOURCE = {"mask-bn": "local-logits", "cbn": "local-logits", "mask-ds": "ablation", "drs": "ablation"}
NETWORK_SOURCE = {"bagnet": "local-logits", "drs": "ablation"}
DEFAULT_VARIANT = {"bagnet": "mask-bn", "drs": "mask-ds"}
FEATURES = ("logits", "confidence", "prediction")
PARITY_RTOL = 1e-4  # fp32 torch vs fp32 onnxruntime: max |difference| / max(1, max |output|)


def load_network(checkpoint: Path) -> tuple[torch.nn.Module, dict, TrainConfig]:
    state, meta = load_checkpoint(Path(checkpoint))
    if meta.get("defense") != "patchguard":
        raise ValueError(f"{checkpoint}: not a PatchGuard checkpoint (defense {meta.get('defense')!r})")
    cfg = TrainConfig(**meta["config"])
    model = build(cfg, meta["num_classes"])
    model.load_state_dict(state)
    return model.eval(), meta, cfg


def _torch_config(meta: dict, cfg: TrainConfig) -> dict:
    if cfg.network == "bagnet":
        return models.config("bagnet-local-logits", meta["num_classes"], cfg.model, (3, *cfg.input_hw))
    return models.config("drs", meta["num_classes"], cfg.model, (4, *cfg.input_hw))


def exported_module(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
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


def _session(model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def parity(model: torch.nn.Module, session: ort.InferenceSession, x: np.ndarray, output: str) -> dict:
    """fp32 torch vs the ONNX engine on the same inputs: relative max error below PARITY_RTOL, same argmax."""
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = session.run([output], {"input": x})[0]
    scale = max(1.0, float(np.abs(ref).max()))
    error = float(np.abs(got - ref).max())
    flat = (lambda a: a.reshape(-1, a.shape[-1]))
    report = {"inputs": len(x), "outputs": int(ref.size), "max_abs_error": error, "scale": scale,
              "rtol": PARITY_RTOL, "argmax_disagreements": int((flat(ref).argmax(1) != flat(got).argmax(1)).sum())}
    if error > PARITY_RTOL * scale:
        raise AssertionError(f"ONNX engine disagrees with torch: {json.dumps(report)}")
    return report


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
        out = _bits(run(np.stack(rows).astype(np.float32)))
        if not np.array_equal(out[0], _bits(run(rows[0][None].astype(np.float32)))[0]):
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


def _test_images(meta: dict, cfg: TrainConfig, data_dir: str | None, eval_data: str | None,
                 eval_limit: int | None) -> datasets.Split:
    test = datasets.load(eval_data or meta["dataset"]["test"], data_dir, tuple(cfg.input_hw))
    if eval_limit and eval_limit < len(test.y):
        test = datasets.Split(test.x[:eval_limit], test.y[:eval_limit], test.classes, test.name,
                              f"{test.note + '; ' if test.note else ''}first {eval_limit} images")
    return test


def export_patchguard(checkpoint: Path, out: Path, variant: str | None = None, threat: str = "5x5",
                      feature: str | None = None, threshold: float | None = None, clip: list | str | None = None,
                      abstain: float | None = None, probe_trials: int = 96, max_batch: int = 1024,
                      data_dir: str | None = None, eval_data: str | None = None,
                      eval_limit: int | None = None) -> dict:
    """Write a robust-masking bundle to ``out``; returns its manifest."""
    model, meta, cfg = load_network(Path(checkpoint))
    variant = variant or DEFAULT_VARIANT[cfg.network]
    params = defense_params(variant, cfg.network, meta.get("ablation"), feature, threshold, clip, abstain)
    hw = tuple(cfg.input_hw)
    geometry = Geometry.from_dict(meta["geometry"])
    rects = list(parse(threat, input_hw=hw).rects)  # fails early on a threat that does not fit
    test = _test_images(meta, cfg, data_dir, eval_data, eval_limit)
    # the images exactly as the runtime prepares them: bilinear resize to the input size, /255, normalized
    x01 = (resize(test.x[:256], hw).astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()
    if cfg.network == "bagnet":
        input_mean, input_std = meta["mean"], meta["std"]  # the checkpoint's values, written to the manifest as is
        mean, std = np.float32(input_mean).reshape(1, 3, 1, 1), np.float32(input_std).reshape(1, 3, 1, 1)
        x = ((x01 - mean) / std).astype(np.float32)
        wrapper, output = LocalLogits(model), "local_logits"
        onnx_model = export_onnx(wrapper, (torch.from_numpy(x[:2]),), ["input"], [output])
        session = _session(onnx_model)
        parity_report = parity(wrapper, session, x, output)
        probe_report = probe(lambda b: session.run([output], {"input": b})[0], x, geometry, rects + [(1, 1)],
                             trials=probe_trials)
        probe_report = {"backend": "onnxruntime-cpu", "kind": "local-logits", **probe_report}
        import onnx  # probe_bundle (certinfer inspect --probe) reads the NCHW input of the single Transpose

        if sum(n.op_type == "Transpose" for n in onnx.load_from_string(onnx_model).graph.node) == 1:
            probe_report["op"] = "Transpose"
    else:
        input_mean, input_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]  # the base classifier takes [0, 1] pixels
        rows = ablation.batch(x01[:8], geometry)
        wrapper, output = model, "logits"
        onnx_model = export_onnx(model, (torch.from_numpy(rows[:2]),), ["input"], [output])
        session = _session(onnx_model)
        parity_report = parity(model, session, rows, output)
        probe_report = {"backend": "onnxruntime-cpu",
                        **ablation_probe(lambda b: session.run([output], {"input": b})[0], x01, geometry,
                                         trials=probe_trials)}
    probe_report["exact_backends"] = ["onnxruntime-cpu"]
    torch_entry, weights = torch_engine(wrapper, _torch_config(meta, cfg), max_batch)
    files = {"model.onnx": onnx_model, "model.safetensors": weights}
    manifest = {
        "schema": 1,
        "defense": {"kind": "masking", "params": params},
        "input": {"hw": list(hw), "channels": 3, "mean": [float(v) for v in input_mean],
                  "std": [float(v) for v in input_std], "classes": meta["classes"], "resize": "bilinear"},
        "geometry": geometry.to_dict(),
        "threat": threat,
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "role": "model",
                     "batch": [1, max_batch]}, torch_entry],
        "probe": probe_report,
        "parity": {"torch_vs_onnxruntime-cpu": parity_report},
        "provenance": {k: meta.get(k) for k in ("preset", "command", "config", "dataset", "seed", "commit")}
                      | {"network": cfg.network, "train_metrics": meta.get("metrics", {})},
    }
    write_bundle(out, manifest, files)
    manifest["provenance"]["metrics"] = runtime_metrics(Path(out), test, threat)
    write_bundle(out, manifest, files)
    return manifest


cli = typer.Typer(add_completion=False)


@cli.command("patchguard")
def export_command(
    checkpoint: Path = typer.Argument(..., help="model.safetensors written by certinfer train patchguard"),
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
    manifest = export_patchguard(checkpoint, out, variant, threat, feature, threshold,
                                 parse_clip(clip) if clip is not None else None, abstain, probe_trials, max_batch,
                                 data_dir=data_dir, eval_limit=eval_limit)
    m = manifest["provenance"]["metrics"]
    typer.echo(json.dumps({"bundle": str(out), "defense": manifest["defense"]["params"],
                           "clean": m["clean_accuracy"], "certified": m["certified_accuracy"],
                           "certified_per_rect": m["certified_accuracy_per_rect"]}))
