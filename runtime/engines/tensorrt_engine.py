"""Native TensorRT backend: deserialize a hash-checked plan, dynamic batch through optimization profile 0.

Written to the documented TensorRT 10 Python API (named I/O tensors, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``); TensorRT is an optional install, so this backend runs
wherever TensorRT exists. Device memory and the CUDA stream come from cuda-python (``cuda.bindings.runtime``,
``cuda.cudart`` before cuda-python 12.6), imported only here: the runtime never needs torch. A plan is specific
to one GPU model and TensorRT version, so the manifest records both (``gpu``: the CUDA device name,
``tensorrt_version``: ``tensorrt.__version__``) and a plan built for anything else is refused before TensorRT
deserializes it (:func:`plan_mismatch`). Plans are built by ``certinfer.export.tensorrt_build``.
"""

from __future__ import annotations

import importlib.util
import re
from math import prod

import numpy as np

from certinfer.runtime.engines import ChunkedEngine, EngineError, Outputs

NOT_INSTALLED = ("TensorRT is not installed: pip install 'certinfer[trt]' on a machine with an NVIDIA GPU "
                 "(the package fetches NVIDIA's libraries at install time), or choose another --backend")


def cuda_runtime():
    """cuda-python's runtime module (device memory, streams); EngineError without cuda-python."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise EngineError("the tensorrt backend needs cuda-python for device memory "
                              "(pip install cuda-python)") from None
    return cudart


def cuda_check(cudart, result):
    """Unwrap a cuda-python call's ``(error, *values)``."""
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"CUDA error: {err}")
    return values[0] if len(values) == 1 else None


def trt_version() -> str | None:
    """The installed TensorRT's version, or None (checked without importing it when absent)."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    import tensorrt

    return tensorrt.__version__


def gpu_name(device_id: int = 0) -> str:
    """The CUDA device's name as plans record it; EngineError without cuda-python or that GPU."""
    cudart = cuda_runtime()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"no CUDA GPU ({err})")
    if count <= device_id:
        raise EngineError(f"no CUDA GPU {device_id} ({count} found)")
    name = cuda_check(cudart, cudart.cudaGetDeviceProperties(device_id)).name
    return (name.split(b"\0")[0].decode() if isinstance(name, bytes) else str(name)).strip()


def plan_mismatch(entry: dict, gpu: str, version: str) -> str | None:
    """Why a plan cannot run on this GPU and TensorRT version, or None when it can (pure: no TensorRT needed).

    A serialized plan holds kernels chosen for one GPU model by one TensorRT release; TensorRT's own check
    happens only inside deserialization, so certinfer decides from the manifest first and names both sides.
    """
    built_gpu, built_version = entry.get("gpu"), entry.get("tensorrt_version")
    if built_gpu == gpu and built_version == version:
        return None
    return (f"{entry.get('file', 'the plan')} was built for {built_gpu} with TensorRT {built_version}, but this "
            f"machine has {gpu} with TensorRT {version}: rebuild the plan here (certinfer export trt BUNDLE)")


def slug(text: str) -> str:
    """A file-name-safe form of a GPU name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def plan_file(role: str, gpu: str | None, precision: str) -> str:
    """The bundle file name of a plan: ``model.<gpu>.<precision>.plan`` (no GPU part while it is unknown)."""
    return ".".join([role, *([slug(gpu)] if gpu else []), precision, "plan"])


def select_entry(bundle, role: str = "model", device_id: int = 0) -> dict:
    """The bundle's plan for this GPU and TensorRT version, or an EngineError saying what is missing."""
    version = trt_version()
    if version is None:
        raise EngineError(NOT_INSTALLED)
    gpu = gpu_name(device_id)
    entries = [e for e in bundle.engines(role) if e["format"] == "tensorrt"]
    if not entries:
        raise EngineError(f"bundle {bundle.path} has no tensorrt engine for role {role!r} (certinfer export trt BUNDLE)")
    reasons = [plan_mismatch(e, gpu, version) for e in entries]
    if None in reasons:
        return entries[reasons.index(None)]
    raise EngineError("; ".join(reasons))


def matching_entry(bundle, role: str = "model", device_id: int = 0) -> dict | None:
    """Like :func:`select_entry`, but None instead of an error (``auto`` then tries onnxruntime)."""
    if not any(e["format"] == "tensorrt" for e in bundle.engines(role)):
        return None  # decided without importing tensorrt
    try:
        return select_entry(bundle, role, device_id)
    except EngineError:
        return None


class TensorRTEngine(ChunkedEngine):
    """A deserialized plan with device buffers for its largest batch, run on its own CUDA stream."""

    name = "tensorrt"

    def __init__(self, bundle, entry: dict, device_id: int = 0):
        version = trt_version()
        if version is None:
            raise EngineError(NOT_INSTALLED)
        if mismatch := plan_mismatch(entry, gpu_name(device_id), version):
            raise EngineError(mismatch)
        import tensorrt as trt

        self._cudart = cudart = cuda_runtime()
        self._buffers: dict[str, int] = {}
        self._device_id = device_id
        cuda_check(cudart, cudart.cudaSetDevice(device_id))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(bundle.read(entry))  # bytes hashed as read
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialize {entry['file']}")
        self._context = self._engine.create_execution_context()
        self.precision = entry["precision"]
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise EngineError(f"{entry['file']} has {len(inputs)} inputs; engine graphs take exactly one")
        self._input, self._outputs = inputs[0], [n for n in names if n != inputs[0]]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        low, _, high = (tuple(d) for d in self._engine.get_tensor_profile_shape(self._input, 0))
        self.min_batch = max(entry["batch"][0], low[0])
        self.max_batch = min(entry["batch"][1], high[0])
        self.input_dtype = self._dtypes[self._input]
        self.input_shape = tuple(None if d < 0 else d for d in tuple(self._engine.get_tensor_shape(self._input))[1:])
        self._stream = cuda_check(cudart, cudart.cudaStreamCreate())
        self._allocate((self.max_batch, *high[1:]))

    def _allocate(self, input_shape: tuple[int, ...]) -> None:
        """Device buffers sized for the largest input; their addresses stay bound to the context."""
        self._context.set_input_shape(self._input, input_shape)
        for name in (self._input, *self._outputs):
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EngineError(f"{name} has a data-dependent shape {shape}, which this backend does not run")
            nbytes = prod(shape) * self._dtypes[name].itemsize
            self._buffers[name] = cuda_check(self._cudart, self._cudart.cudaMalloc(nbytes))
            self._context.set_tensor_address(name, self._buffers[name])

    def _run(self, batch: np.ndarray) -> Outputs:
        cudart, kind = self._cudart, self._cudart.cudaMemcpyKind
        # the current CUDA device is per thread: a Certifier shared by camera threads calls from any of them
        cuda_check(cudart, cudart.cudaSetDevice(self._device_id))
        if not self._context.set_input_shape(self._input, batch.shape):
            raise EngineError(f"TensorRT rejected input shape {batch.shape}")
        cuda_check(cudart, cudart.cudaMemcpyAsync(self._buffers[self._input], batch.ctypes.data, batch.nbytes,
                                                  kind.cudaMemcpyHostToDevice, self._stream))
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineError("TensorRT execute_async_v3 failed")
        outs = []
        for name in self._outputs:
            host = np.empty(tuple(self._context.get_tensor_shape(name)), self._dtypes[name])
            cuda_check(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name], host.nbytes,
                                                      kind.cudaMemcpyDeviceToHost, self._stream))
            outs.append(host)
        cuda_check(cudart, cudart.cudaStreamSynchronize(self._stream))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def close(self) -> None:
        """Free the device buffers and the stream (also done when the engine is collected)."""
        for ptr in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        if hasattr(self, "_cudart"):
            self.close()
