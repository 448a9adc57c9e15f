"""onnxruntime backend: the bundle's ONNX graph on the CPU, CUDA or TensorRT execution provider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from certinfer.runtime.engines import ChunkedEngine, EngineError, Outputs, cache_dir, opt_batch

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_NAMES = {v: f"onnxruntime-{k}" for k, v in PROVIDERS.items()}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(uint8)": np.uint8, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def input_spec(model: bytes) -> tuple[str, tuple]:
    """The graph's single input: its name and per-sample dims (ints, or names for free dims)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only reads the input
    inp = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).get_inputs()[0]
    return inp.name, tuple(inp.shape[1:])


def trt_profile(input_name: str, dims: tuple, batch: list[int], opt: int | None = None) -> dict[str, str]:
    """TensorRT EP profile shapes for the manifest's batch range, so it builds one engine for the whole range."""
    if not all(isinstance(d, int) for d in dims):
        return {}  # free spatial dims: leave the profile to the provider
    tail = "".join(f"x{d}" for d in dims)
    lo, hi = batch
    return {"trt_profile_min_shapes": f"{input_name}:{lo}{tail}",
            "trt_profile_opt_shapes": f"{input_name}:{opt_batch(batch, opt)}{tail}",
            "trt_profile_max_shapes": f"{input_name}:{hi}{tail}"}


def trt_cache_folder(entry: dict, root: Path | None = None) -> Path:
    """Where the TensorRT EP keeps engines and timing caches for one model: a subfolder per model hash, so a
    changed model never meets a stale engine."""
    return (root or cache_dir() / "ort-tensorrt") / entry["sha256"][:16]


def provider_options(kind: str, entry: dict, device_id: int = 0, fp16: bool | None = None,
                     cache: Path | None = None, profile: dict[str, str] | None = None) -> list:
    """onnxruntime's ``providers`` list for a provider kind, from the manifest's engine entry (pure).

    CUDA: the device. TensorRT: the device; fp16 as asked, else as the entry's precision says; engine and
    timing caches in :func:`trt_cache_folder`; ``profile`` from :func:`trt_profile`. Every GPU kind keeps the
    lower-priority providers behind it for the nodes it cannot run.
    """
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if kind == "cuda":
        return [cuda, "CPUExecutionProvider"]
    if kind != "tensorrt":
        raise EngineError(f"unknown onnxruntime provider {kind!r}; choose one of {', '.join(PROVIDERS)}")
    folder = str(trt_cache_folder(entry, cache))
    trt = {"device_id": device_id, "trt_fp16_enable": entry["precision"] == "fp16" if fp16 is None else fp16,
           "trt_engine_cache_enable": True, "trt_engine_cache_path": folder,
           "trt_timing_cache_enable": True, "trt_timing_cache_path": folder, **(profile or {})}
    return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]


def _providers(kind: str, model: bytes, entry: dict, device_id: int, fp16: bool | None, cache: Path | None) -> list:
    if kind != "tensorrt":
        return provider_options(kind, entry, device_id)
    trt_cache_folder(entry, cache).mkdir(parents=True, exist_ok=True)
    name, dims = input_spec(model)
    return provider_options(kind, entry, device_id, fp16, cache, trt_profile(name, dims, entry["batch"]))


def _resolve(provider: str) -> tuple[str, bool]:
    """(provider kind, strict): ``best`` is CUDA where onnxruntime has it, quietly falling back to the CPU."""
    available = ort.get_available_providers()
    if provider == "best":
        return ("cuda" if PROVIDERS["cuda"] in available else "cpu"), False
    if provider not in PROVIDERS:
        raise EngineError(f"unknown onnxruntime provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in available:
        raise EngineError(f"onnxruntime-{provider} needs onnxruntime's {PROVIDERS[provider]}, which onnxruntime "
                          f"{ort.__version__} here does not have (it has {', '.join(available)}); install "
                          "onnxruntime-gpu (and TensorRT for the TensorRT provider) on a machine with a CUDA GPU")
    return provider, True


class OnnxRuntimeEngine(ChunkedEngine):
    """An onnxruntime session over the bundle's hash-checked ONNX bytes.

    ``provider``: ``cpu``, ``cuda``, ``tensorrt`` (each required: an error if onnxruntime falls back to another)
    or ``best``. ``fp16`` (default: the entry's precision) and ``cache_dir`` apply to the TensorRT provider;
    ``threads`` caps intra-op threads. ``precision``: the entry's, or ``fp16`` when the TensorRT provider is
    forced to fp16.
    """

    def __init__(self, bundle, entry: dict, provider: str = "best", device_id: int = 0, fp16: bool | None = None,
                 cache_dir: str | Path | None = None, threads: int | None = None):
        kind, strict = _resolve(provider)
        model = bundle.read(entry)  # read once, hashed as read: the session gets exactly the verified bytes
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        cache = Path(cache_dir) if cache_dir is not None else None
        try:
            self._session = ort.InferenceSession(model, options,
                                                 providers=_providers(kind, model, entry, device_id, fp16, cache))
        except Exception as err:  # onnxruntime raises its own exception types for bad graphs and providers
            raise EngineError(f"onnxruntime cannot load {entry['file']}: {err}") from err
        used = self._session.get_providers()[0]
        if strict and used != PROVIDERS[kind]:
            raise EngineError(f"onnxruntime-{kind} is not usable here (onnxruntime fell back to {used}): "
                              "is a CUDA GPU visible, with the CUDA/cuDNN/TensorRT libraries onnxruntime needs?")
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise EngineError(f"{entry['file']} has {len(inputs)} inputs; engine graphs take exactly one")
        inp = inputs[0]
        if inp.type not in _DTYPES:
            raise EngineError(f"{entry['file']}: unsupported input type {inp.type}")
        self.name = _NAMES.get(used, f"onnxruntime-{used}")
        self.precision = "fp16" if used == PROVIDERS["tensorrt"] and fp16 else entry["precision"]
        self._input = inp.name
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.input_dtype = np.dtype(_DTYPES[inp.type])
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape[1:])
        lo, hi = entry["batch"]
        fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
        # onnxruntime runs any batch of a dynamic graph; only TensorRT's profile needs the manifest's minimum
        self.min_batch = fixed or (lo if used == PROVIDERS["tensorrt"] else 1)
        self.max_batch = fixed or hi

    def _run(self, batch: np.ndarray) -> Outputs:
        outs = self._session.run(self._outputs, {self._input: batch})
        return outs[0] if len(outs) == 1 else tuple(outs)
