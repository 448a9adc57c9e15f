"""torch backend, for parity checks and GPU benchmarks where TensorRT is absent.

A ``format: "torch"`` engine entry is a safetensors file of weights (never a pickle). The module is rebuilt by
the ``builder`` option, a callable from the model config (the entry's ``config``, else ``provenance.config``) to
a torch module; the runtime has no model code of its own, so the caller supplies it (``certinfer.load`` passes
the trainer's ``build``). The config's ``input_shape`` (per sample) is the engine's input shape, else the
manifest input's (channels, H, W). torch and safetensors are imported only when this backend is chosen.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from certinfer.runtime.engines import ChunkedEngine, EngineError, Outputs, run_chunked


def strict_fp32() -> None:
    """Make CUDA convolutions and matrix products compute in fp32: cuDNN's default TF32 rounds to 10-bit mantissas,
    far outside what the certificates' margins and the parity checks assume (process-wide: torch has no
    per-module switch)."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _to_numpy(out) -> Outputs:
    if isinstance(out, (tuple, list)):
        return tuple(_to_numpy(o) for o in out)
    out = out.detach()
    return (out.float() if out.is_floating_point() else out).cpu().numpy()


class TorchEngine(ChunkedEngine):
    """The bundle's model as a torch module: CPU or CUDA, optionally fp16, optionally one CUDA graph per batch size.

    ``builder(config) -> torch.nn.Module`` rebuilds the module the weights belong to (required).
    """

    def __init__(self, bundle, entry: dict, device: str = "cpu", cuda_graphs: bool = False, fp16: bool = False,
                 builder: Callable | None = None):
        try:
            import torch
            from safetensors.torch import load as load_safetensors
        except ImportError as err:
            raise EngineError(f"the torch backend needs torch and safetensors (certinfer[train]): {err}") from None
        if builder is None:
            raise EngineError("the torch backend needs a model builder: pass engine_options={'builder': build} "
                              "(certinfer.load passes certinfer.train.models.build; install certinfer[train])")
        self._torch = torch
        self._device = torch.device(device)
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("no CUDA GPU: torch.cuda.is_available() is False")
        if cuda_graphs and self._device.type != "cuda":
            raise EngineError("CUDA graphs need device='cuda'")
        config = entry.get("config", bundle.manifest["provenance"].get("config"))
        if config is None:
            raise EngineError(f"{entry['file']}: no model config (engine entry 'config' or provenance.config)")
        try:
            module = builder(config)
        except (ValueError, TypeError, KeyError) as err:
            raise EngineError(f"{entry['file']}: the model builder cannot rebuild the module from its config: "
                              f"{type(err).__name__}: {err}") from None
        try:
            module.load_state_dict(load_safetensors(bundle.read(entry)), strict=True)  # bytes hashed as read
        except RuntimeError as err:
            raise EngineError(f"{entry['file']} does not fit the model built from its config: {err}") from None
        if self._device.type == "cuda" and not fp16:
            strict_fp32()
        self._dtype = torch.float16 if fp16 else torch.float32
        self.precision = "fp16" if fp16 else "fp32"
        self._module = module.eval().to(device=self._device, dtype=self._dtype)
        self._graphs: dict[int, tuple] = {}
        self._masks: tuple | None = None
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.name = "torch-cuda-graphs" if cuda_graphs else f"torch-{self._device.type}"
        self.min_batch, self.max_batch = 1, entry["batch"][1]
        inp = bundle.manifest["input"]
        self.input_dtype = np.dtype(np.float32)
        shape = config.get("input_shape") if isinstance(config, dict) else None  # DRS (4, H, W), crops (5, ch, cw)
        if shape:
            self.input_shape = tuple(int(v) for v in shape)
        else:
            self.input_shape = (inp["channels"], *inp["hw"]) if entry["role"] == "model" else None

    def _capture(self, x):
        """One CUDA graph for this batch size, over a static input buffer (warmed up on a side stream first)."""
        torch = self._torch
        static = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._module(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._module(static)
        return static, out, graph

    def _run(self, batch: np.ndarray) -> Outputs:
        with self._torch.inference_mode():
            return self._forward(self._torch.from_numpy(batch).to(self._device, self._dtype))

    def _forward(self, x) -> Outputs:
        """The module on one chunk already on the device (a CUDA graph per chunk size with ``cuda_graphs``)."""
        if self._pool is None:
            return _to_numpy(self._module(x))
        if len(x) not in self._graphs:
            self._graphs[len(x)] = self._capture(x)
        static, out, graph = self._graphs[len(x)]
        static.copy_(x)
        graph.replay()
        return _to_numpy(out)  # copies to the host, so the next replay cannot overwrite it

    def run_masked(self, base: np.ndarray, masks: np.ndarray, frames: np.ndarray, a: np.ndarray, b: np.ndarray,
                   value: np.ndarray) -> Outputs:
        """``run(masked_copies(base, masks[a] | masks[b], frames, value))`` with the copies built on the device:
        only the frames and the mask indices travel (a GPU spends most of a certified frame moving host-built
        copies otherwise). The copies hold the same bits and run in the same chunks as through :meth:`run`."""
        torch = self._torch
        base = self._check(base)
        if masks.shape[1:] != base.shape[2:]:
            raise EngineError(f"{self.name}: masks {masks.shape} do not fit frames {base.shape}")
        with torch.inference_mode():
            index = [torch.from_numpy(np.asarray(v, dtype=np.int64)).to(self._device) for v in (frames, a, b)]
            on_device = self._device_masks(masks)
            masked = (on_device[index[1]] | on_device[index[2]])[:, None]
            fill = torch.as_tensor(np.asarray(value, dtype=np.float32).reshape(-1, 1, 1), device=self._device)
            x = torch.where(masked, fill, torch.from_numpy(base).to(self._device)[index[0]]).to(self._dtype)
            return run_chunked(self._forward, x, self.max_batch, self.min_batch)

    def _device_masks(self, masks: np.ndarray):
        """The mask set on the device, uploaded once per set (kept with the array it came from)."""
        key = (masks.shape, masks.tobytes())
        if self._masks is None or self._masks[0] != key:
            self._masks = key, self._torch.from_numpy(np.array(masks, dtype=bool)).to(self._device)  # a writable copy
        return self._masks[1]
