"""Backend parity: every backend installed here against onnxruntime CPU, on real frames, through the defense.

Each backend gets the bundle's Certifier (seeded where the defense is randomized, so every backend sees the same
draws). Engine outputs are compared on exactly the inputs the reference's Certifier fed its engines (every role),
decisions frame by frame. For each backend the report gives the outputs' max abs error (float outputs) or
mismatched values (integer outputs), argmax (label) agreement and certificate agreement; for BagCert also the
binary-map agreement and the flips the backend did not flag as near the threshold. The policy for backends that
are not bit-exact (``probe.exact_backends``, see ``runtime.defenses.bagcert``) treats flagged cells as
adversarial, so an unflagged flip means that backend's certificates cannot be trusted: :func:`parity_problems`
names it and ``certinfer export trt`` refuses such a plan. Backends that cannot run here are listed with the
reason. The report goes into the manifest as ``parity.backends`` (``certinfer export parity BUNDLE`` redoes it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from certinfer.export import ExportError
from certinfer.export.bundle_writer import rewrite_bundle
from certinfer.runtime.bundle import Bundle, load_bundle
from certinfer.runtime.certifier import Certifier
from certinfer.runtime.defenses import DefenseError, certifier_class
from certinfer.runtime.engines import EngineError
from certinfer.runtime.frames import resize
from certinfer.runtime.loader import certifier_for, open_engines
from certinfer.runtime.packaged import data_dir as packaged_data
from certinfer.threat import parse

REFERENCE = "onnxruntime-cpu"
CANDIDATES = ("torch-cpu", "torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
COMPARISON_SEED = 0  # a randomized defense's draws, the same for every backend (a comparison, never deployment)
_DATASETS = ("gtsrb", "cifar10", "folder")


# --- frames and engines -----------------------------------------------------------------------------------

def real_frames(source: str | None, hw: tuple[int, int], limit: int = 256,
                data_dir: str | None = None) -> np.ndarray:
    """Up to ``limit`` real uint8 RGB frames at the model input size: the packaged samples (None), a dataset
    spec (``gtsrb:test``, ``cifar10:train``, ``folder:PATH``) or an image file or folder."""
    if source is not None and source.partition(":")[0] in _DATASETS:
        from certinfer.train import data as datasets

        return resize(datasets.load(source, data_dir, hw).x[:limit], hw)
    from certinfer.runtime.stream import open_source

    frames = []
    for _, frame in open_source(source if source is not None else packaged_data("samples")):
        if isinstance(frame, np.ndarray):
            frames.append(resize(frame[None], hw)[0])
        if len(frames) == limit:
            break
    if not frames:
        raise ValueError(f"no readable frames in {source}")
    return np.stack(frames)


def model_builder() -> Callable | None:
    """The trainer's model builder (what a torch engine rebuilds its module with), or None where torch is absent."""
    try:
        from certinfer.train.models import build
    except ImportError:
        return None
    return build


def engine_options(backend: str, device_id: int = 0, builder: Callable | None = None) -> dict[str, Any]:
    """The options a backend's engine takes: a model builder for torch (default: :func:`model_builder`), the
    CUDA device otherwise."""
    if backend.startswith("torch"):
        builder = builder or model_builder()
        return {"builder": builder} if builder is not None else {}
    return {"device_id": device_id}


class Recording:
    """An engine that keeps every call's input and outputs (what the defense fed the real engine)."""

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[tuple[np.ndarray, Any]] = []

    def __getattr__(self, name: str):  # name, precision, max_batch... as the engine has them
        if name == "run_masked":  # not offered: every input must pass through run() to be recorded
            raise AttributeError(name)
        return getattr(self.engine, name)

    def run(self, batch: np.ndarray):
        outputs = self.engine.run(batch)
        self.calls.append((batch.copy(), outputs))
        return outputs


def _seeded(certifier: Certifier) -> Certifier:
    return certifier.seeded(COMPARISON_SEED) if certifier.randomized else certifier


def certifier_with(bundle: Bundle, engines: dict[str, Any]) -> Certifier:
    """The bundle's Certifier over given ``engines`` (one per role: recorded, or one TensorRT plan each), against
    its own threat; seeded when randomized."""
    m = bundle.manifest
    threat = parse(m["threat"], input_hw=tuple(m["input"]["hw"]))  # a percentage threat needs the input size
    return _seeded(certifier_class(m["defense"]["kind"])(bundle, engines, threat))


def roles(bundle: Bundle) -> tuple[str, ...]:
    """The engine roles the bundle's defense runs."""
    return certifier_class(bundle.manifest["defense"]["kind"]).roles_for(bundle.manifest)


def recording_certifier(bundle: Bundle, backend: str = REFERENCE,
                        options: dict[str, Any] | None = None) -> tuple[Certifier, dict[str, Recording]]:
    """The bundle's Certifier on ``backend`` with every engine recorded; the recordings by role."""
    recordings = {r: Recording(e) for r, e in open_engines(bundle, roles(bundle), backend, options).items()}
    return certifier_with(bundle, recordings), recordings


def engine_inputs(bundle: Bundle, frames: np.ndarray, limit: int, batch: int = 64, role: str = "model") -> np.ndarray:
    """The engine inputs the bundle's defense makes from ``frames`` (e.g. for int8 calibration), at most ``limit``."""
    certifier, recordings = recording_certifier(bundle)
    for i in range(0, len(frames), batch):
        certifier.timed_features(frames[i:i + batch])
        if sum(len(x) for x, _ in recordings[role].calls) >= limit:
            break
    return np.concatenate([x for x, _ in recordings[role].calls])[:limit]


def _candidates(bundle: Bundle, backend: str, device_id: int, builder) -> list[tuple[str, Certifier]]:
    """(report name, Certifier) for a backend; TensorRT gives one per model plan built for this machine."""
    if backend != "tensorrt":
        options = engine_options(backend, device_id, builder)
        return [(backend, _seeded(certifier_for(bundle, backend, engine_options=options)))]
    from certinfer.runtime.engines import tensorrt_engine as te

    te.select_entry(bundle, device_id=device_id)  # EngineError when no plan can run here
    gpu, version = te.gpu_name(device_id), te.trt_version()
    others = tuple(r for r in roles(bundle) if r != "model")
    return [(f"tensorrt:{e['file']}",
             certifier_with(bundle, {"model": te.TensorRTEngine(bundle, e, device_id=device_id),
                                     **open_engines(bundle, others, "tensorrt", {"device_id": device_id})}))
            for e in bundle.engines() if e["format"] == "tensorrt" and te.plan_mismatch(e, gpu, version) is None]


# --- comparison (pure) ------------------------------------------------------------------------------------

def _as_tuple(out) -> tuple[np.ndarray, ...]:
    return out if isinstance(out, tuple) else (out,)


def compare_outputs(ref, got, code_maps: bool = False) -> dict:
    """Engine outputs of a backend against the reference's. ``code_maps``: BagCert's uint8 codes (bit 0 the
    binary score, bit 1 the near-threshold flag)."""
    report: dict = {"max_abs_error": 0.0, "mismatched_values": 0, "values": 0}
    for r, g in zip(_as_tuple(ref), _as_tuple(got)):
        if r.shape != g.shape:
            raise ValueError(f"output shapes differ: {r.shape} vs {g.shape}")
        diff = np.abs(r.astype(np.float64) - g.astype(np.float64))
        report["max_abs_error"] = max(report["max_abs_error"], float(diff.max(initial=0.0)))
        report["mismatched_values"] += int((r != g).sum())
        report["values"] += int(r.size)
    if code_maps:
        r, g = _as_tuple(ref)[0], _as_tuple(got)[0]
        flips = (r & 1) != (g & 1)
        report["binary_cells"] = int(flips.size)
        report["binary_disagreements"] = int(flips.sum())
        # the backend's own near flags are what its certificates treat as adversarial
        report["unflagged_flips"] = int((flips & (((g >> 1) & 1) == 0)).sum())
        report["binary_agreement"] = float(1.0 - flips.mean())
    return report


def merge_outputs(total: dict | None, part: dict) -> dict:
    """Two :func:`compare_outputs` reports (of different engine calls) as one."""
    if total is None:
        return dict(part)
    merged = {k: total[k] + part[k] for k in part if k not in ("max_abs_error", "binary_agreement")}
    merged["max_abs_error"] = max(total["max_abs_error"], part["max_abs_error"])
    if "binary_cells" in merged:
        merged["binary_agreement"] = 1.0 - merged["binary_disagreements"] / max(merged["binary_cells"], 1)
    return merged


def compare_decisions(ref: list, got: list) -> dict:
    """Labels and certificates of a backend against the reference's, frame by frame."""
    n = len(ref)
    same_label = sum(r.label == g.label for r, g in zip(ref, got))
    same_cert = sum(r.label == g.label and r.certificate.certified == g.certificate.certified
                    for r, g in zip(ref, got))
    return {"frames": n, "argmax_agreement": same_label / n, "certificate_agreement": same_cert / n,
            "certified_only_by_backend": sum(g.certificate.certified and not r.certificate.certified
                                             for r, g in zip(ref, got)),
            "certified_only_by_reference": sum(r.certificate.certified and not g.certificate.certified
                                               for r, g in zip(ref, got))}


def parity_problems(report: dict) -> list[str]:
    """What in a parity report makes a backend's certificates untrustworthy (empty: nothing)."""
    problems = []
    for name, r in report.get("compared", {}).items():
        if r.get("unflagged_flips", 0) > 0:
            problems.append(f"{name}: {r['unflagged_flips']} binary cells differ from {REFERENCE} without the "
                            "near-threshold flag (pre-activations off by more than the export tolerance)")
        if r.get("exact") and r.get("mismatched_values", 0) > 0:
            problems.append(f"{name} is listed as bit-exact but {r['mismatched_values']} output values differ")
    return problems


# --- running the backends -------------------------------------------------------------------------------

def backend_parity(bundle: Bundle, frames: np.ndarray, backends=CANDIDATES, source: str = "", batch: int = 64,
                   device_id: int = 0, builder: Callable | None = None) -> dict:
    """Every backend in ``backends`` against onnxruntime CPU on ``frames`` (uint8 RGB at the model size).

    ``device_id`` goes to the CUDA backends, ``builder`` (default: the trainer's) to the torch ones.
    """
    m = bundle.manifest
    code_maps = m["defense"]["kind"] == "bagcert"
    exact = m.get("probe", {}).get("exact_backends", [])
    report: dict = {"reference": REFERENCE, "frames": int(len(frames)), "source": source, "compared": {},
                    "absent": {}}
    candidates: list[tuple[str, Certifier]] = []
    for backend in backends:
        try:
            candidates += _candidates(bundle, backend, device_id, builder)
        except (EngineError, DefenseError) as err:
            report["absent"][backend] = str(err).replace(f"bundle {bundle.path}", "the bundle")  # no local paths
    reference, recordings = recording_certifier(bundle)
    outputs: dict[str, dict | None] = {name: None for name, _ in candidates}
    decisions: dict[str, list] = {name: [] for name, _ in candidates}
    expected: list = []
    for i in range(0, len(frames), batch):
        for rec in recordings.values():
            rec.calls.clear()
        expected += reference.certify(reference.timed_features(frames[i:i + batch])[0])
        for name, certifier in candidates:
            for role, rec in recordings.items():
                for x, ref_out in rec.calls:
                    got = certifier.engines[role].run(x)
                    outputs[name] = merge_outputs(outputs[name], compare_outputs(ref_out, got, code_maps))
            decisions[name] += certifier.certify(certifier.timed_features(frames[i:i + batch])[0])
    for name, certifier in candidates:
        backend = certifier.engine.name
        report["compared"][name] = {"backend": backend, "exact": backend in exact, **(outputs[name] or {}),
                                    **compare_decisions(expected, decisions[name])}
    return report


def record_parity(bundle_dir: Path, report: dict) -> dict:
    """Write ``report`` into the bundle folder's manifest as ``parity.backends``; returns the new manifest."""
    bundle = load_bundle(bundle_dir)
    manifest = {**bundle.manifest, "parity": {**bundle.manifest.get("parity", {}), "backends": report}}
    rewrite_bundle(bundle, manifest, Path(bundle_dir), {})
    return manifest


cli = typer.Typer(add_completion=False)


@cli.command("parity")
def parity_command(
    bundle: Path = typer.Argument(..., help="Bundle folder"),
    frames: Optional[str] = typer.Option(None, help="Real frames: gtsrb:test, folder:PATH, a folder "
                                                    "[default: samples]"),
    limit: int = typer.Option(256, min=1, help="At most this many frames"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder for dataset specs"),
    device_id: int = typer.Option(0, min=0, help="CUDA device for the GPU backends"),
    write: bool = typer.Option(True, help="Write the report into the manifest (parity.backends)"),
) -> None:
    """Compare every backend installed here with onnxruntime CPU on real frames (outputs, labels, certificates)."""
    loaded = load_bundle(bundle)
    x = real_frames(frames, tuple(loaded.manifest["input"]["hw"]), limit, data_dir)
    report = backend_parity(loaded, x, source=frames or "packaged sample frames", device_id=device_id)
    if write:
        record_parity(bundle, report)
    typer.echo(json.dumps(report, indent=2))
    if problems := parity_problems(report):
        raise ExportError("; ".join(problems))
