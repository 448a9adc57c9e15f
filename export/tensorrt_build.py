"""Build a TensorRT plan from a bundle's ONNX graph and add it to the bundle: ``certinfer export trt BUNDLE``.

Written to the documented TensorRT 10 Python API: ``OnnxParser`` into a network, one optimization profile for
the engine entry's batch range (tuned for an opt batch), a timing cache kept in the user cache folder, and the
precision asked for: ``fp32`` (TF32 off: IEEE float32), ``fp16`` (a strongly typed network over an fp16 copy of
the graph where TensorRT has ``STRONGLY_TYPED``, else the FP16 builder flag) or ``int8`` (entropy calibration
over real frames, refused without them). The plan enters the manifest with its sha256, the GPU and TensorRT
version it was built for (the runtime refuses it anywhere else), then a parity report against onnxruntime CPU.

TensorRT is an optional install (``certinfer[trt]``), so this module imports it only inside :func:`build_plan`. The
command always prints the equivalent ``trtexec`` line first; without TensorRT it stops there with one clear
line, and a plan built outside can be added with ``--plan PLAN --gpu NAME --tensorrt-version V``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from certinfer.export import ExportError
from certinfer.export.bundle_writer import rewrite_bundle
from certinfer.export.onnx_fp16 import Fp16Error, to_fp16
from certinfer.export.parity import backend_parity, engine_inputs, parity_problems, real_frames, record_parity
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.engines import EngineError, cache_dir, engine_entry, opt_batch
from certinfer.runtime.engines.tensorrt_engine import (NOT_INSTALLED, cuda_check, cuda_runtime, gpu_name, plan_file,
                                                       trt_version)

PRECISIONS = ("fp32", "fp16", "int8")
WORKSPACE_MB = 1024


class BuildError(RuntimeError):
    """TensorRT could not parse the graph or build the plan (its own messages attached)."""


# --- pure parts: profile, cache paths, the trtexec line, the manifest entry --------------------------------

@dataclass(frozen=True)
class Profile:
    """One optimization profile: the graph input's name, per-sample dims and the (min, opt, max) batch."""

    input_name: str
    dims: tuple[int, ...]
    batch: tuple[int, int, int]

    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple((b, *self.dims) for b in self.batch)

    def spec(self, b: int) -> str:
        """trtexec's shape syntax: ``input:8x3x32x32``."""
        return f"{self.input_name}:" + "x".join(str(d) for d in (b, *self.dims))


def make_profile(input_name: str, dims: tuple, batch: list[int], opt: int | None = None) -> Profile:
    """The profile for an engine entry's batch range; every per-sample dim must be fixed."""
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise BuildError(f"input {input_name} has free per-sample dims {dims}: a plan needs them fixed")
    lo, hi = batch
    return Profile(input_name, tuple(dims), (lo, opt_batch(batch, opt), hi))


def trt_cache_dir() -> Path:
    """Where native builds keep their timing and calibration caches (``<cache_dir>/tensorrt``)."""
    return cache_dir() / "tensorrt"


def timing_cache_path(root: Path | None = None) -> Path:
    return (root or trt_cache_dir()) / "timing.cache"


def calibration_cache_path(model_sha256: str, data_tag: str, root: Path | None = None) -> Path:
    """One calibration cache per model and calibration data (TensorRT reuses it instead of calibrating again)."""
    tag = hashlib.sha256(data_tag.encode()).hexdigest()[:12]
    return (root or trt_cache_dir()) / f"calib-{model_sha256[:16]}-{tag}.cache"


def trtexec_command(onnx: Path, plan: Path, profile: Profile, precision: str, timing_cache: Path,
                    calibration_cache: Path | None = None, workspace_mb: int = WORKSPACE_MB) -> list[str]:
    """The ``trtexec`` argv that builds the same plan as :func:`build_plan` (TensorRT 10's own CLI)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    lo, opt, hi = profile.batch
    argv = ["trtexec", f"--onnx={onnx}", f"--saveEngine={plan}", f"--minShapes={profile.spec(lo)}",
            f"--optShapes={profile.spec(opt)}", f"--maxShapes={profile.spec(hi)}",
            f"--timingCacheFile={timing_cache}", f"--memPoolSize=workspace:{workspace_mb}M", "--skipInference"]
    if precision == "fp32":
        argv.append("--noTF32")
    elif precision == "fp16":
        argv.append("--fp16")
    else:  # INT8 scales come from the calibration cache our calibrator writes; without it trtexec guesses
        argv += ["--int8", "--fp16", f"--calib={calibration_cache}"]
    return argv


def plan_entry(onnx_entry: dict, file: str, precision: str, profile: Profile, gpu: str, version: str,
               fp16_mode: str | None = None) -> dict:
    """The manifest engine entry of a plan (sha256 is filled in by write_bundle)."""
    entry = {"file": file, "format": "tensorrt", "precision": precision, "role": onnx_entry.get("role", "model"),
             "batch": [profile.batch[0], profile.batch[2]], "opt_batch": profile.batch[1], "gpu": gpu,
             "tensorrt_version": version, "source": onnx_entry["file"], "source_sha256": onnx_entry["sha256"]}
    if fp16_mode:
        entry["fp16_mode"] = fp16_mode
    return entry


def with_plan(manifest: dict, entry: dict) -> dict:
    """The manifest with ``entry`` added, replacing a plan for the same role, GPU, TensorRT and precision."""
    same = ("role", "gpu", "tensorrt_version", "precision")
    kept = [e for e in manifest["engines"]
            if not (e["format"] == "tensorrt" and all(e.get(k) == entry.get(k) for k in same))]
    return {**manifest, "engines": [*kept, entry]}


# --- TensorRT ---------------------------------------------------------------------------------------------

def _parse(trt, builder, logger, onnx: bytes, strongly_typed: bool):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT's ONNX parser rejected the graph: {errors or 'no details'}")
    return network, parser  # the parser must outlive the build (it owns the parsed weights)


def _load_timing_cache(config, path: Path):
    """The saved timing cache, or an empty one when there is none or TensorRT rejects it (other GPU/version)."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def build_plan(onnx: bytes, profile: Profile, precision: str, timing_cache: Path, calibrator=None,
               workspace_mb: int = WORKSPACE_MB) -> tuple[bytes, str | None]:
    """A serialized plan for this GPU, and how fp16 was asked for (``strongly-typed``, ``builder-flag``, None)."""
    import tensorrt as trt

    if precision == "int8" and calibrator is None:
        raise BuildError("int8 needs calibration data (--calib-data): without it TensorRT's scales are guesses")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    fp16_mode = None
    graph, strongly_typed = onnx, False
    if precision == "fp16":
        fp16_mode = "builder-flag"
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            try:
                graph, strongly_typed, fp16_mode = to_fp16(onnx), True, "strongly-typed"
            except Fp16Error:
                pass  # e.g. a Resize: TensorRT's FP16 flag picks fp16 kernels per layer instead
    network, _parser = _parse(trt, builder, logger, graph, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(profile.input_name, *profile.shapes())
    config.add_optimization_profile(trt_profile)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 rounds conv inputs to 10 mantissa bits
    elif fp16_mode == "builder-flag":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers without int8 kernels may use fp16
        config.int8_calibrator = calibrator
        config.set_calibration_profile(trt_profile)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    cache = _load_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("TensorRT could not build the plan (see its log above)")
    timing_cache.write_bytes(memoryview(cache.serialize()))
    return bytes(plan), fp16_mode


def make_calibrator(batches: list[np.ndarray], cache_path: Path):
    """An IInt8EntropyCalibrator2 that feeds ``batches`` (engine inputs from real frames) through device memory."""
    import tensorrt as trt

    cudart = cuda_runtime()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._device = cuda_check(cudart, cudart.cudaMalloc(batches[0].nbytes))

        def get_batch_size(self) -> int:
            return len(batches[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None  # calibration done
            host = np.ascontiguousarray(batch)
            cuda_check(cudart, cudart.cudaMemcpy(self._device, host.ctypes.data, host.nbytes,
                                                 cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            return [int(self._device)]

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(cache))

        def free(self) -> None:
            cudart.cudaFree(self._device)

    return EntropyCalibrator()


def calibration_batches(inputs: np.ndarray, batch: int) -> list[np.ndarray]:
    """Full batches of ``batch`` engine inputs (the calibration profile's opt shape); the rest is dropped."""
    n = len(inputs) // batch
    if n == 0:
        raise BuildError(f"int8 calibration needs at least {batch} engine inputs (the opt batch), got {len(inputs)}")
    return [np.ascontiguousarray(inputs[i * batch:(i + 1) * batch]) for i in range(n)]


# --- the bundle ---------------------------------------------------------------------------------------------

def _calibration_inputs(bundle, calib_data: str, frames: int, data_dir: str | None) -> np.ndarray:
    hw = tuple(bundle.manifest["input"]["hw"])
    return engine_inputs(bundle, real_frames(calib_data, hw, frames, data_dir), frames)


def _register(bundle, out: Path, entry: dict, plan: Path | bytes) -> Path:
    return rewrite_bundle(bundle, with_plan(bundle.manifest, entry), out, {entry["file"]: plan})


def _check_parity(out: Path, entry: dict, parity_frames: str | None, data_dir: str | None, device_id: int) -> dict:
    """Parity of every backend here against onnxruntime CPU, written into the manifest; a plan whose outputs
    break the certificate policy is taken out of the bundle again."""
    bundle = load_bundle(out)
    frames = real_frames(parity_frames, tuple(bundle.manifest["input"]["hw"]), 256, data_dir)
    report = backend_parity(bundle, frames, source=parity_frames or "packaged sample frames", device_id=device_id)
    problems = parity_problems(report)
    if any(entry["file"] in p for p in problems):
        manifest = {**bundle.manifest, "engines": [e for e in bundle.manifest["engines"] if e["file"] != entry["file"]]}
        rewrite_bundle(bundle, manifest, out, {})
        (out / entry["file"]).unlink(missing_ok=True)
        raise ExportError(f"the plan breaks the certificate policy, so it was not added: {'; '.join(problems)}")
    record_parity(out, report)
    return report


def export_trt(bundle_path: Path, out: Path | None = None, precision: str = "fp16", opt: int | None = None,
               role: str = "model", calib_data: str | None = None, calib_frames: int = 512,
               data_dir: str | None = None, device_id: int = 0, workspace_mb: int = WORKSPACE_MB,
               parity_frames: str | None = None, plan: Path | None = None, gpu: str | None = None,
               version: str | None = None, echo=print) -> dict:
    """Build (or, with ``plan``, register) a plan for a bundle's ONNX graph; returns the new engine entry."""
    from certinfer.runtime.engines.onnxruntime_engine import input_spec

    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and calib_data is None and plan is None:
        raise ExportError("int8 needs calibration data: pass --calib-data (e.g. gtsrb:train, or a folder of frames); "
                         "without it TensorRT's int8 scales would be guesses")
    bundle = load_bundle(bundle_path)
    if out is None and not Path(bundle_path).is_dir():
        raise ExportError(f"{bundle_path} is an archive: pass --out FOLDER for the bundle with the plan")
    out = Path(out or bundle_path)
    onnx_entry = engine_entry(bundle, "onnx", role)
    onnx = bundle.read(onnx_entry)
    profile = make_profile(*input_spec(onnx), onnx_entry["batch"], opt)
    if plan is None:
        installed = trt_version()
        try:
            gpu = gpu_name(device_id) if installed else None
        except EngineError:
            gpu = None
    file = plan_file(role, gpu, precision)
    calib_cache = calibration_cache_path(onnx_entry["sha256"], f"{calib_data}:{calib_frames}")
    if out != Path(bundle_path):  # the bundle (without a plan yet) at --out, so the trtexec line names lasting files
        rewrite_bundle(bundle, bundle.manifest, out, {})
    echo(shlex.join(trtexec_command(out / onnx_entry["file"], out / file, profile, precision, timing_cache_path(),
                                    calib_cache, workspace_mb)))
    if plan is not None:
        if not (gpu and version):
            raise ExportError("--plan needs --gpu (the CUDA device name) and --tensorrt-version it was built with")
        entry = plan_entry(onnx_entry, plan_file(role, gpu, precision), precision, profile, gpu, version)
        _register(bundle, out, entry, Path(plan))
    else:
        if installed is None:
            raise ExportError(f"{NOT_INSTALLED}: build the plan with the trtexec line above on the target GPU, then "
                             "add it with certinfer export trt BUNDLE --plan PLAN --gpu NAME --tensorrt-version V")
        if gpu is None:
            raise ExportError(f"TensorRT {installed} is installed but there is no CUDA GPU {device_id} to build for")
        calibrator = None
        if precision == "int8":
            inputs = _calibration_inputs(bundle, calib_data, calib_frames, data_dir)
            calibrator = make_calibrator(calibration_batches(inputs, profile.batch[1]), calib_cache)
        try:
            data, fp16_mode = build_plan(onnx, profile, precision, timing_cache_path(), calibrator, workspace_mb)
        finally:
            if calibrator is not None:
                calibrator.free()
        entry = plan_entry(onnx_entry, file, precision, profile, gpu, installed, fp16_mode)
        _register(bundle, out, entry, data)
    _check_parity(out, entry, parity_frames, data_dir, device_id)
    return entry


cli = typer.Typer(add_completion=False)


@cli.command("trt")
def trt_command(
    bundle: Path = typer.Argument(..., help="Bundle folder (or .tar with --out) whose ONNX graph to build"),
    out: Optional[Path] = typer.Option(None, help="Write the bundle with the plan here [default: in place]"),
    precision: str = typer.Option("fp16", help="fp32, fp16 or int8 (int8 needs --calib-data)"),
    opt_batch_: Optional[int] = typer.Option(None, "--opt-batch", min=1, help="Batch the profile is tuned for"),
    role: str = typer.Option("model", help="Which of the bundle's graphs"),
    calib_data: Optional[str] = typer.Option(None, help="int8 calibration frames: gtsrb:train, folder:PATH, a folder"),
    calib_frames: int = typer.Option(512, min=1, help="Engine inputs used for int8 calibration"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder for dataset specs"),
    device_id: int = typer.Option(0, min=0, help="CUDA device to build for"),
    workspace_mb: int = typer.Option(WORKSPACE_MB, min=1, help="TensorRT builder workspace"),
    parity_frames: Optional[str] = typer.Option(None, help="Real frames for the parity report [default: the samples]"),
    plan: Optional[Path] = typer.Option(None, help="Add this plan, built outside (trtexec), instead of building"),
    gpu: Optional[str] = typer.Option(None, help="With --plan: the CUDA device name it was built on"),
    tensorrt_version: Optional[str] = typer.Option(None, help="With --plan: the TensorRT version it was built with"),
) -> None:
    """Build a TensorRT plan for a bundle's ONNX graph and add it to the bundle (prints the trtexec line too)."""
    entry = export_trt(bundle, out, precision, opt_batch_, role, calib_data, calib_frames, data_dir, device_id,
                       workspace_mb, parity_frames, plan, gpu, tensorrt_version, echo=typer.echo)
    typer.echo(json.dumps({"bundle": str(out or bundle), "engine": entry}))
