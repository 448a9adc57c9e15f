"""The skeleton every exporter shares: the training checkpoint, the test images, frames prepared as the runtime
prepares them, the manifest's common sections, parity against torch, and the bundle written once.

An exporter (``export/NAME.py``) rebuilds the trained network (:func:`load_trained`), exports its graph(s), runs
its defense's own checks (parity, receptive-field or rounding probes), assembles the manifest with
:func:`manifest` and hands it to :func:`publish`, which stages the engine files, measures the bundle's accuracy
through the runtime itself (the same Certifier users load) and only then writes the sealed ``manifest.json``.
A failed export therefore leaves no loadable bundle behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from certinfer.export.bundle_writer import stage_bundle, write_manifest
from certinfer.export.parity import backend_parity, parity_problems
from certinfer.runtime.bundle import SCHEMA, Bundle
from certinfer.runtime.defenses import canonical
from certinfer.runtime.evaluate import evaluate_certifier
from certinfer.runtime.frames import resize
from certinfer.runtime.loader import certifier_for
from certinfer.train import data as datasets
from certinfer.train.loop import load_checkpoint

PARITY_RTOL = 1e-4  # fp32 torch vs fp32 onnxruntime: max |difference| / max(1, max |output|)
METRICS_BACKEND = "onnxruntime-cpu"  # the backend the recorded accuracy is measured on
METRICS_SEED = 0  # a randomized defense's draws for the recorded accuracy (reproducible; never a deployment setting)
CHECK_IMAGES = 500  # the fixed slice of the test data CI re-measures on every shipped bundle
SHORT_CHECK_IMAGES = 200  # the slice of bundles that run the whole model hundreds of times per frame


def load_trained(checkpoint: str | Path, defense: str) -> tuple[dict, dict]:
    """A training checkpoint's weights and record, refused unless ``defense`` (or an older name of it) wrote it."""
    state, meta = load_checkpoint(Path(checkpoint))
    if canonical(str(meta.get("defense"))) != defense:
        raise ValueError(f"{checkpoint}: not a {defense} checkpoint (defense {meta.get('defense')!r})")
    return state, meta


def eval_split(meta: dict, input_hw: tuple[int, int], data_dir: str | None = None, data: str | None = None,
                limit: int | None = None) -> datasets.Split:
    """The images the exporter checks and measures on: ``data`` (default: the checkpoint's test part), the first
    ``limit`` of them where given."""
    test = datasets.load(data or meta["dataset"]["test"], data_dir, tuple(input_hw))
    if limit and limit < len(test.y):
        note = f"{test.note + '; ' if test.note else ''}first {limit} images"
        test = datasets.Split(test.x[:limit], test.y[:limit], test.classes, test.name, note)
    return test


def prepare(frames: np.ndarray, input_hw: tuple[int, int], mean, std) -> np.ndarray:
    """uint8 (N, H, W, 3) frames -> float32 NCHW exactly as a Certifier prepares them (bilinear resize, /255,
    normalized with the manifest's mean and std)."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    x = resize(frames, tuple(input_hw)).astype(np.float32) / 255.0
    return np.ascontiguousarray((x.transpose(0, 3, 1, 2) - m) / s, dtype=np.float32)


def cpu_session(onnx: bytes) -> ort.InferenceSession:
    """An onnxruntime CPU session over exported ONNX bytes (the reference the checks run on)."""
    return ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])


def float_parity(ref: np.ndarray, got: np.ndarray, what: str = "ONNX engine", rtol: float = PARITY_RTOL,
                 **report: Any) -> dict:
    """fp32 torch (``ref``) vs the exported graph (``got``): max abs error within ``rtol`` of max(1, max |ref|).

    Returns the report (``report`` entries first); raises AssertionError with it otherwise.
    """
    scale = max(1.0, float(np.abs(ref).max()))
    error = float(np.abs(got - ref).max())
    report = {**report, "max_abs_error": error, "scale": scale, "rtol": rtol}
    if error > rtol * scale:
        raise AssertionError(f"{what} disagrees with torch: {report}")
    return report


def argmax_disagreements(ref: np.ndarray, got: np.ndarray) -> int:
    """How many rows (over the last axis) have a different argmax."""
    flat = (lambda a: a.reshape(-1, a.shape[-1]))
    return int((flat(ref).argmax(1) != flat(got).argmax(1)).sum())


def onnx_engine(max_batch: int, file: str = "model.onnx", role: str = "model") -> dict:
    """The manifest entry of an fp32 ONNX graph (its sha256 is filled in when the bundle is written)."""
    return {"file": file, "format": "onnx", "precision": "fp32", "role": role, "batch": [1, int(max_batch)]}


def manifest(kind: str, params: dict, input_hw: tuple[int, int], mean, std, classes: list[str], threat: str,
             engines: list[dict], parity: dict, meta: dict, provenance_extra: dict | None = None,
             **sections: Any) -> dict:
    """A manifest of the current schema: the defense, the input, ``sections`` (``geometry``, ``probe``), the
    threat, the engines, the parity reports and the provenance (from the checkpoint's record, plus
    ``provenance_extra``)."""
    extra = provenance_extra or {}
    return {"schema": SCHEMA,
            "defense": {"kind": kind, "params": params},
            "input": {"hw": list(input_hw), "channels": 3, "mean": [float(v) for v in mean],
                      "std": [float(v) for v in std], "classes": list(classes), "resize": "bilinear"},
            **sections,
            "threat": threat,
            "engines": engines,
            "parity": parity,
            "provenance": {k: meta.get(k) for k in ("preset", "command", "config", "dataset", "seed", "commit")}
                          | ({"init": meta["init"]} if meta.get("init") else {})  # the checkpoint fine-tuned
                          | extra | {"train_metrics": meta.get("metrics", {})}}


def runtime_metrics(bundle: Bundle, split: datasets.Split, threat: str, batch: int = 256) -> dict:
    """Accuracy measured through the runtime itself (the bundle's Certifier on onnxruntime CPU; a randomized
    defense seeded with METRICS_SEED), with the data it was measured on: ``provenance.metrics``."""
    certifier = certifier_for(bundle, METRICS_BACKEND, threat)
    if certifier.randomized:
        certifier = certifier.seeded(METRICS_SEED)
    result = evaluate_certifier(certifier, split.x, split.y, batch=batch)
    seeded = {"seed": METRICS_SEED} if certifier.randomized else {}
    return {**result, "data": split.name, "data_note": split.note, **seeded}


def slice_check(bundle: Bundle, split: datasets.Split, threat: str, metrics: dict, batch: int = 256,
                images: int = CHECK_IMAGES) -> dict:
    """What CI re-measures on every shipped bundle: the correct and certified-correct counts on the first
    ``images`` test images, on onnxruntime CPU (the metrics themselves when they cover exactly those)."""
    n = min(images, len(split.y))
    if n != len(split.y):
        metrics = runtime_metrics(bundle, datasets.Split(split.x[:n], split.y[:n], split.classes, split.name),
                                  threat, batch)
    return {"data": split.name, "images": n, "backend": METRICS_BACKEND, "clean": metrics["clean"],
            "certified": metrics["variants"]["default"]["certified"]}


def publish(out: str | Path, manifest: dict, files: dict[str, bytes | Path], test: datasets.Split,
            metrics_batch: int = 256, parity_frames: np.ndarray | None = None,
            check_images: int = CHECK_IMAGES) -> dict:
    """Write the bundle to ``out`` once: engine files staged, accuracy on ``test`` measured through the runtime
    (``provenance.metrics``), then the sealed manifest. ``parity_frames``: also compare every backend installed
    here with onnxruntime CPU on these frames (``parity.backends``); one that breaks the certificate policy fails
    the export. ``check_images``: the slice CI re-measures (``provenance.check``). Returns the manifest as written."""
    bundle = stage_bundle(out, manifest, files)
    m = bundle.manifest
    m["provenance"]["metrics"] = runtime_metrics(bundle, test, m["threat"], metrics_batch)
    m["provenance"]["check"] = slice_check(bundle, test, m["threat"], m["provenance"]["metrics"], metrics_batch,
                                           check_images)
    if parity_frames is not None:
        m["parity"]["backends"] = backend_parity(bundle, parity_frames, source=test.name)
        if problems := parity_problems(m["parity"]["backends"]):
            raise AssertionError(f"a backend installed here breaks the certificate policy: {'; '.join(problems)}")
    write_manifest(bundle)
    return m


def summary(out: str | Path, written: dict) -> str:
    """One JSON line for the export command: the bundle, its defense parameters and its measured accuracy."""
    metrics = written["provenance"]["metrics"]
    return json.dumps({"bundle": str(out), "defense": written["defense"]["params"],
                       "clean": metrics["clean_accuracy"], "certified": metrics["certified_accuracy"],
                       "certified_per_rect": metrics["certified_accuracy_per_rect"]})
