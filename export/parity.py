"""Backend parity: every backend installed here against onnxruntime CPU, on real frames, through the defense.

For each backend the report gives the engine outputs' max abs error (float outputs) or mismatched values
(integer outputs), argmax (label) agreement and certificate agreement; for BagCert also the binary-map
agreement and the flips the backend did not flag as near the threshold. The policy for backends that are not
bit-exact (``probe.exact_backends``, see ``runtime.defenses.bagcert``) treats flagged cells as adversarial, so
an unflagged flip means that backend's certificates cannot be trusted: :func:`parity_problems` names it and
``certinfer export trt`` refuses such a plan. Backends that cannot run here are listed with the reason.
The report goes into the manifest as ``parity.backends`` (``certinfer export parity BUNDLE`` redoes it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

REFERENCE = "onnxruntime-cpu"
CANDIDATES = ("torch-cpu", "torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
_DATASETS = ("gtsrb", "cifar10", "folder")


# --- frames ---------------------------------------------------------------------------------------------

def real_frames(source: str | None, hw: tuple[int, int], limit: int = 256,
                data_dir: str | None = None) -> np.ndarray:
    """Up to ``limit`` real uint8 RGB frames at the model input size: the packaged samples (None), a dataset
    spec (``gtsrb:test``, ``cifar10:train``, ``folder:PATH``) or an image file or folder."""
    from certinfer.runtime.certifier import resize

    if source is not None and source.partition(":")[0] in _DATASETS:
        from certinfer.train import data as datasets

        x = datasets.load(source, data_dir, hw).x[:limit]
        return resize(x, hw)
    import certinfer
    from certinfer.runtime.stream import open_source

    frames = []
    for _, frame in open_source(source if source is not None else certinfer.sample_frames()):
        if isinstance(frame, np.ndarray):
            frames.append(resize(frame[None], hw)[0])
        if len(frames) == limit:
            break
    if not frames:
        raise ValueError(f"no readable frames in {source}")
    return np.stack(frames)


def _certifier(bundle, engine):
    from certinfer.runtime.defenses import certifier_class
    from certinfer.threat import parse

    m = bundle.manifest
    threat = parse(m["threat"], input_hw=tuple(m["input"]["hw"]))  # a percentage threat needs the input size
    certifier = certifier_class(m["defense"]["kind"])(bundle, engine, threat)
    if hasattr(certifier, "fix_seed"):  # randomized defenses: every backend sees the same draws (comparison only)
        certifier.fix_seed(0)
    return certifier


class _Recorder:
    """An engine that keeps a copy of every batch it is given (what the defense feeds the real engine)."""

    def __init__(self, engine):
        self.engine, self.name, self.max_batch = engine, engine.name, engine.max_batch
        self.inputs: list[np.ndarray] = []

    def run(self, batch: np.ndarray):
        self.inputs.append(batch.copy())
        return self.engine.run(batch)


def engine_inputs(bundle, frames: np.ndarray, limit: int, batch: int = 64) -> np.ndarray:
    """The engine inputs the bundle's defense makes from ``frames`` (e.g. for int8 calibration), at most ``limit``."""
    from certinfer.runtime.engines import load_engine

    certifier = _certifier(bundle, load_engine(bundle, REFERENCE))
    recorder = certifier.engine = _Recorder(certifier.engine)
    for i in range(0, len(frames), batch):
        certifier(frames[i:i + batch])
        if sum(len(x) for x in recorder.inputs) >= limit:
            break
    return np.concatenate(recorder.inputs)[:limit]


# --- comparison (pure) ----------------------------------------------------------------------------------

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
        report["binary_agreement"] = float(1.0 - flips.mean())
        report["binary_disagreements"] = int(flips.sum())
        # the backend's own near flags are what its certificates treat as adversarial
        report["unflagged_flips"] = int((flips & (((g >> 1) & 1) == 0)).sum())
    return report


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

def _run(certifier, frames: np.ndarray, batch: int) -> tuple[list, list]:
    outputs, decisions = [], []
    for i in range(0, len(frames), batch):
        x = certifier.prepare(frames[i:i + batch])
        out = certifier.run_engine(x)
        outputs.append(_as_tuple(out))
        decisions += certifier.decide(x, out)
    merged = tuple(np.concatenate(parts) for parts in zip(*outputs))
    return merged if len(merged) > 1 else merged[0], decisions


def _options(backend: str, device_id: int, builder) -> dict:
    if backend.startswith("torch"):
        return {"builder": builder} if builder is not None else {}
    return {"device_id": device_id}


def _engines(bundle, backend: str, device_id: int, builder) -> list[tuple[str, object]]:
    """(report name, engine) pairs for a backend; TensorRT gives one per plan built for this machine."""
    from certinfer.runtime.engines import load_engine

    if backend != "tensorrt":
        return [(backend, load_engine(bundle, backend, **_options(backend, device_id, builder)))]
    from certinfer.runtime.engines import tensorrt_engine as te

    te.select_entry(bundle, device_id=device_id)  # EngineError when no plan can run here
    gpu, version = te.gpu_name(device_id), te.trt_version()
    return [(f"tensorrt:{e['file']}", te.TensorRTEngine(bundle, e, device_id=device_id))
            for e in bundle.engines() if e["format"] == "tensorrt" and te.plan_mismatch(e, gpu, version) is None]


def backend_parity(bundle, frames: np.ndarray, backends=CANDIDATES, source: str = "", batch: int = 64,
                   device_id: int = 0, builder=None) -> dict:
    """Every backend in ``backends`` against onnxruntime CPU on ``frames`` (uint8 RGB at the model size).

    ``device_id`` goes to the CUDA backends, ``builder`` (the model builder) to the torch ones.
    """
    from certinfer.runtime.defenses import DefenseError
    from certinfer.runtime.engines import EngineError, load_engine

    code_maps = bundle.manifest["defense"]["kind"] == "bagcert"
    exact = bundle.manifest.get("probe", {}).get("exact_backends", [])
    ref_out, ref_dec = _run(_certifier(bundle, load_engine(bundle, REFERENCE)), frames, batch)
    report = {"reference": REFERENCE, "frames": int(len(frames)), "source": source, "compared": {}, "absent": {}}
    for backend in backends:
        try:
            engines = _engines(bundle, backend, device_id, builder)
        except (EngineError, DefenseError) as err:
            report["absent"][backend] = str(err).replace(f"bundle {bundle.path}", "the bundle")  # no local paths
            continue
        for name, engine in engines:
            out, dec = _run(_certifier(bundle, engine), frames, batch)
            report["compared"][name] = {"backend": engine.name, "exact": engine.name in exact,
                                        **compare_outputs(ref_out, out, code_maps), **compare_decisions(ref_dec, dec)}
    return report


def record_parity(bundle_dir: Path, report: dict) -> dict:
    """Write ``report`` into the bundle folder's manifest as ``parity.backends``; returns the new manifest."""
    from certinfer.export.tensorrt_build import rewrite_bundle
    from certinfer.runtime.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    manifest = {**bundle.manifest, "parity": {**bundle.manifest.get("parity", {}), "backends": report}}
    rewrite_bundle(bundle, manifest, Path(bundle_dir), {})
    return manifest


cli = typer.Typer(add_completion=False)


@cli.command("parity")
def parity_command(
    bundle: Path = typer.Argument(..., help="Bundle folder"),
    frames: Optional[str] = typer.Option(None, help="Real frames: gtsrb:test, folder:PATH, a folder [default: samples]"),
    limit: int = typer.Option(256, min=1, help="At most this many frames"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder for dataset specs"),
    device_id: int = typer.Option(0, min=0, help="CUDA device for the GPU backends"),
    write: bool = typer.Option(True, help="Write the report into the manifest (parity.backends)"),
) -> None:
    """Compare every backend installed here with onnxruntime CPU on real frames (outputs, labels, certificates)."""
    from certinfer.runtime.bundle import load_bundle

    loaded = load_bundle(bundle)
    x = real_frames(frames, tuple(loaded.manifest["input"]["hw"]), limit, data_dir)
    report = backend_parity(loaded, x, source=frames or "packaged sample frames", device_id=device_id)
    if write:
        record_parity(bundle, report)
    typer.echo(json.dumps(report, indent=2))
    if problems := parity_problems(report):
        from certinfer.cli import CLIError

        raise CLIError("; ".join(problems))
