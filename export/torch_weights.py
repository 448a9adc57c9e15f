"""The bundle's torch engine: the exported module's weights as safetensors, rebuilt by
``certinfer.train.models.build`` from the entry's ``config`` (see ``runtime/engines/torch_engine.py``).

``certinfer export torch BUNDLE CHECKPOINT`` adds one to a bundle written before exporters wrote it, leaving the
other engine files byte-identical, and records every backend's parity against onnxruntime CPU.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Optional

import torch
import typer
from safetensors.torch import save

from certinfer.export.bundle_writer import rewrite_bundle
from certinfer.export.parity import backend_parity, parity_problems, real_frames, record_parity
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.defenses import defense
from certinfer.train.models import build

FILE = "model.safetensors"
FLOAT_TOL = 1e-3  # fp32 torch vs onnxruntime CPU: max abs difference of float outputs (logits)


def torch_engine(module: torch.nn.Module, config: dict, max_batch: int) -> tuple[dict, bytes]:
    """(engine entry, safetensors bytes) for ``module``; fails now if ``build(config)`` cannot take its weights."""
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    build(config).load_state_dict(state, strict=True)
    entry = {"file": FILE, "format": "torch", "precision": "fp32", "role": "model", "batch": [1, int(max_batch)],
             "config": config}
    return entry, save(state)


def _module(kind: str, checkpoint: Path, manifest: dict) -> tuple[torch.nn.Module, dict]:
    """The module the bundle's ONNX was exported from, rebuilt from the training checkpoint by the defense's
    exporter (its ``exported_module``), and its config."""
    exporter = import_module(defense(kind).exporter.partition(":")[0])
    if not hasattr(exporter, "exported_module"):
        raise ValueError(f"no torch engine export for defense {kind!r}")
    return exporter.exported_module(checkpoint, manifest)


def add_torch_engine(bundle_dir: Path, checkpoint: Path, frames: str | None = None,
                     data_dir: str | None = None) -> dict:
    """Add (or replace) the torch engine of a bundle folder in place; returns the new manifest.

    Every backend here is then compared with onnxruntime CPU on real frames (``parity.backends``); a torch
    engine that flips BagCert cells without the near-threshold flag, or whose float outputs differ by more than
    ``FLOAT_TOL``, is taken out again and the export fails.
    """
    folder = Path(bundle_dir)
    bundle = load_bundle(folder)
    m = bundle.manifest
    module, config = _module(m["defense"]["kind"], Path(checkpoint), m)
    onnx_batch = next(e["batch"][1] for e in m["engines"] if e["format"] == "onnx")
    entry, weights = torch_engine(module, config, onnx_batch)
    engines = [e for e in m["engines"] if e["format"] != "torch"] + [entry]
    bundle = load_bundle(rewrite_bundle(bundle, {**m, "engines": engines}, folder, {FILE: weights}))
    x = real_frames(frames, tuple(m["input"]["hw"]), 256, data_dir)
    report = backend_parity(bundle, x, source=frames or "packaged sample frames")
    got = report["compared"].get("torch-cpu")
    problems = parity_problems(report)
    if got is None or problems or (m["defense"]["kind"] != "bagcert" and got["max_abs_error"] > FLOAT_TOL):
        rewrite_bundle(bundle, {**m, "engines": [e for e in m["engines"] if e["format"] != "torch"]}, folder, {})
        (folder / FILE).unlink()
        raise AssertionError(f"the torch engine does not match {report['reference']}: "
                             f"{'; '.join(problems) or json.dumps(got or report['absent'])[:500]}")
    return record_parity(folder, report)


cli = typer.Typer(add_completion=False)


@cli.command("torch")
def export_command(
    bundle: Path = typer.Argument(..., help="Bundle folder (changed in place)"),
    checkpoint: Path = typer.Argument(..., help="The training checkpoint its ONNX was exported from"),
    frames: Optional[str] = typer.Option(None, help="Parity frames: gtsrb:test, folder:PATH [default: samples]"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder for dataset specs"),
) -> None:
    """Add a torch engine (safetensors weights + model config) to a bundle, checked against onnxruntime CPU."""
    manifest = add_torch_engine(bundle, checkpoint, frames, data_dir)
    compared = manifest["parity"]["backends"]["compared"]
    typer.echo(json.dumps({"bundle": str(bundle), "torch-cpu": compared["torch-cpu"]}))
