"""Engines on tiny real models exported from torch in the test: every backend installed here, chunking,
multi-output graphs, backend selection and the errors for backends this machine lacks."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save as save_safetensors

from certinfer.export.bundle_writer import write_bundle
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.engines import Engine, EngineError, cache_dir, load_engine, opt_batch, run_chunked
from certinfer.runtime.engines.onnxruntime_engine import provider_options, trt_cache_folder, trt_profile
from certinfer.runtime.engines.tensorrt_engine import gpu_name, plan_mismatch, trt_version

torch.set_num_threads(1)

HW = (8, 8)
ORT_PROVIDERS = ort.get_available_providers()
HAS_ORT_CUDA = "CUDAExecutionProvider" in ORT_PROVIDERS
HAS_ORT_TRT = "TensorrtExecutionProvider" in ORT_PROVIDERS
HAS_TORCH_CUDA = torch.cuda.is_available()
TRT = trt_version()
TRT_SKIP = "TensorRT is not installed here; its build and run tests run wherever it is"


def has_gpu() -> bool:
    try:
        gpu_name()
        return True
    except EngineError:
        return False


class TinyNet(torch.nn.Module):
    """A small local-feature conv net: class-score map, and optionally its features as a second output."""

    def __init__(self, width: int = 4, classes: int = 3, two_outputs: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.head = torch.nn.Conv2d(width, classes, 1)
        self.two_outputs = two_outputs

    def forward(self, x):
        features = torch.relu(self.conv(x))
        scores = self.head(features)
        return (scores, features) if self.two_outputs else scores


def build(config: dict) -> TinyNet:
    return TinyNet(**config)


def make_bundle(root: Path, config: dict, batch=(1, 16), extra_engines=(), extra_files=None):
    torch.manual_seed(0)
    model = build(config).eval()
    outputs = ["scores", "features"] if config.get("two_outputs") else ["scores"]
    onnx_path = root.parent / f"{root.name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.zeros(2, 3, *HW),), onnx_path, input_names=["x"], output_names=outputs,
                          dynamic_axes={n: {0: "n"} for n in ["x", *outputs]}, dynamo=False)
    manifest = {
        "defense": {"kind": "test", "params": {}},
        "input": {"hw": list(HW), "channels": 3, "mean": [0.0] * 3, "std": [1.0] * 3, "classes": ["a", "b", "c"]},
        "threat": "2x2",
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "batch": list(batch)},
                    {"file": "model.safetensors", "format": "torch", "precision": "fp32", "batch": list(batch)},
                    *extra_engines],
        "provenance": {"config": config},
    }
    files = {"model.onnx": onnx_path, "model.safetensors": save_safetensors(model.state_dict()), **(extra_files or {})}
    return load_bundle(write_bundle(root, manifest, files)), model


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("single") / "b", {"width": 4})


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("chunked") / "b", {"width": 4}, batch=(1, 3))


@pytest.fixture(scope="module")
def double(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("double") / "b", {"width": 4, "two_outputs": True}, batch=(1, 4))


def frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, *HW)).astype(np.float32)


def reference(model: TinyNet, x: np.ndarray):
    with torch.no_grad():
        out = model(torch.from_numpy(x))
    return tuple(o.numpy() for o in out) if isinstance(out, tuple) else out.numpy()


def test_onnxruntime_cpu_matches_torch(single):
    bundle, model = single
    engine = load_engine(bundle, "onnxruntime-cpu")
    assert isinstance(engine, Engine) and engine.name == "onnxruntime-cpu" and engine.max_batch == 16
    x = frames(5)
    np.testing.assert_allclose(engine.run(x), reference(model, x), atol=1e-5, rtol=0)


def test_the_onnxruntime_path_never_imports_torch(single, tmp_path):
    code = ("import sys, numpy as np\n"
            "from certinfer.runtime.bundle import load_bundle\n"
            "from certinfer.runtime.engines import load_engine, tensorrt_engine, torch_engine\n"
            f"engine = load_engine(load_bundle({str(single[0].path)!r}))\n"
            "engine.run(np.zeros((2, 3, 8, 8), np.float32))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)  # cwd: not the repo's certinfer/


def test_chunking_equals_one_call(single, chunked):
    one = load_engine(single[0], "onnxruntime-cpu")
    small = load_engine(chunked[0], "onnxruntime-cpu")
    assert small.max_batch == 3
    sizes = []
    inner = small._run
    small._run = lambda b: sizes.append(len(b)) or inner(b)
    x = frames(10, seed=1)
    np.testing.assert_array_equal(small.run(x), one.run(x))
    assert sizes == [3, 3, 3, 1]


def test_run_chunked_pads_short_chunks_to_the_minimum_batch():
    sizes = []

    def fn(b):
        sizes.append(len(b))
        return b * 2, b.sum(axis=1)

    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    doubled, sums = run_chunked(fn, x, max_batch=4, min_batch=4)
    assert sizes == [4, 4, 4]
    np.testing.assert_array_equal(doubled, x * 2)
    np.testing.assert_array_equal(sums, x.sum(axis=1))
    assert run_chunked(fn, x[:1], max_batch=4, min_batch=2)[0].shape == (1, 2)


def test_multi_output_graph_returns_a_tuple(double):
    bundle, model = double
    x = frames(7, seed=2)  # also chunked: max batch 4
    for engine in (load_engine(bundle, "onnxruntime-cpu"), load_engine(bundle, "torch", builder=build)):
        out = engine.run(x)
        assert isinstance(out, tuple) and len(out) == 2
        for got, want in zip(out, reference(model, x)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.skipif(HAS_ORT_CUDA or (TRT is not None and has_gpu()), reason="a GPU backend is available here")
@pytest.mark.parametrize("backend", ["auto", "onnxruntime", "ort"])
def test_auto_and_onnxruntime_pick_the_cpu_here(single, backend):
    assert load_engine(single[0], backend).name == "onnxruntime-cpu"


def test_input_dtype_and_shape_are_checked(single):
    engine = load_engine(single[0], "onnxruntime-cpu")
    with pytest.raises(EngineError, match="takes float32 input, got float64"):
        engine.run(frames(2).astype(np.float64))
    with pytest.raises(EngineError, match=r"shape \(N>0, 3, 8, 8\)"):
        engine.run(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(EngineError, match="shape"):
        engine.run(np.zeros((0, 3, 8, 8), np.float32))


def test_missing_engine_or_backend_is_a_clear_error(single):
    bundle = single[0]
    with pytest.raises(EngineError, match="unknown backend 'cuda'"):
        load_engine(bundle, "cuda")
    with pytest.raises(EngineError, match="no onnx engine for role 'bounds'"):
        load_engine(bundle, "onnxruntime-cpu", role="bounds")
    with pytest.raises(EngineError, match="no torch engine for role 'bounds'"):
        load_engine(bundle, "torch", role="bounds", builder=build)


@pytest.mark.skipif(TRT is not None, reason="TensorRT is installed here")
def test_tensorrt_requested_without_tensorrt(single):
    with pytest.raises(EngineError, match=r"TensorRT is not installed: pip install 'certinfer\[trt\]'"):
        load_engine(single[0], "tensorrt")


@pytest.mark.skipif(HAS_ORT_CUDA, reason="onnxruntime has the CUDA provider here")
def test_onnxruntime_cuda_requested_without_it(single):
    with pytest.raises(EngineError, match="needs onnxruntime's CUDAExecutionProvider"):
        load_engine(single[0], "onnxruntime-cuda")


@pytest.mark.skipif(HAS_ORT_TRT, reason="onnxruntime has the TensorRT provider here")
def test_onnxruntime_tensorrt_requested_without_it(single):
    with pytest.raises(EngineError, match="needs onnxruntime's TensorrtExecutionProvider"):
        load_engine(single[0], "onnxruntime-tensorrt")


@pytest.mark.skipif(HAS_TORCH_CUDA, reason="torch sees a CUDA GPU here")
@pytest.mark.parametrize("backend", ["torch-cuda", "torch-cuda-graphs"])
def test_torch_cuda_requested_without_a_gpu(single, backend):
    with pytest.raises(EngineError, match="no CUDA GPU"):
        load_engine(single[0], backend, builder=build)


def test_auto_passes_over_a_plan_it_cannot_use(tmp_path):
    plan = {"file": "model.plan", "format": "tensorrt", "precision": "fp16", "batch": [1, 16],
            "gpu": "Some Other GPU", "tensorrt_version": "10.0.0"}
    bundle, _ = make_bundle(tmp_path / "b", {"width": 4}, extra_engines=[plan],
                            extra_files={"model.plan": b"not a plan"})
    expected = "onnxruntime-cuda" if HAS_ORT_CUDA else "onnxruntime-cpu"
    if TRT is None or not has_gpu():
        assert load_engine(bundle).name == expected
    if TRT is None:
        with pytest.raises(EngineError, match="TensorRT is not installed"):
            load_engine(bundle, "tensorrt")


def test_plan_mismatch_names_both_targets():
    entry = {"file": "model.plan", "gpu": "NVIDIA H100 80GB HBM3", "tensorrt_version": "10.3.0"}
    assert plan_mismatch(entry, "NVIDIA H100 80GB HBM3", "10.3.0") is None
    message = plan_mismatch(entry, "NVIDIA A100-SXM4-40GB", "10.3.0")
    assert "built for NVIDIA H100 80GB HBM3 with TensorRT 10.3.0" in message and "A100" in message
    assert "TensorRT 10.5.0" in plan_mismatch(entry, "NVIDIA H100 80GB HBM3", "10.5.0")


def test_cache_dir_and_opt_batch(monkeypatch, tmp_path):
    monkeypatch.setenv("CERTINFER_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CERTINFER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "certinfer"
    assert (opt_batch([1, 1024]), opt_batch([1, 16]), opt_batch([8, 16], 2), opt_batch([1, 16], 4)) == (64, 16, 8, 4)


def test_provider_options_from_the_manifest(tmp_path):
    entry = {"file": "model.onnx", "precision": "fp32", "batch": [1, 256], "sha256": "ab" * 32}
    assert provider_options("cpu", entry) == ["CPUExecutionProvider"]
    assert provider_options("cuda", entry, device_id=1) == [("CUDAExecutionProvider", {"device_id": 1}),
                                                            "CPUExecutionProvider"]
    profile = trt_profile("x", (3, 32, 32), entry["batch"])
    assert profile == {"trt_profile_min_shapes": "x:1x3x32x32", "trt_profile_opt_shapes": "x:64x3x32x32",
                       "trt_profile_max_shapes": "x:256x3x32x32"}
    assert trt_profile("x", (3, "h", "w"), entry["batch"]) == {}
    (name, trt), cuda, cpu = provider_options("tensorrt", entry, device_id=1, cache=tmp_path, profile=profile)
    folder = str(tmp_path / ("ab" * 8))
    assert name == "TensorrtExecutionProvider" and cuda == ("CUDAExecutionProvider", {"device_id": 1})
    assert trt == {"device_id": 1, "trt_fp16_enable": False, "trt_engine_cache_enable": True,
                   "trt_engine_cache_path": folder, "trt_timing_cache_enable": True,
                   "trt_timing_cache_path": folder, **profile}
    half = provider_options("tensorrt", dict(entry, precision="fp16"))[0][1]
    assert half["trt_fp16_enable"] and half["trt_engine_cache_path"] == str(trt_cache_folder(entry))
    assert not provider_options("tensorrt", dict(entry, precision="fp16"), fp16=False)[0][1]["trt_fp16_enable"]
    with pytest.raises(EngineError, match="unknown onnxruntime provider 'rocm'"):
        provider_options("rocm", entry)


def test_torch_engine_matches_torch_and_onnxruntime(single):
    bundle, model = single
    engine = load_engine(bundle, "torch", builder=build)
    assert engine.name == "torch-cpu" and engine.max_batch == 16
    x = frames(20, seed=3)  # chunked into 16 + 4
    got = engine.run(x)
    np.testing.assert_allclose(got, reference(model, x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got, load_engine(bundle, "onnxruntime-cpu").run(x), atol=1e-5, rtol=0)


def _masked_inputs(seed: int = 5):
    """Three frames, a mask set with a bit pattern per mask, and 20 rows (frame, mask a, mask b) over them."""
    rng = np.random.default_rng(seed)
    base = frames(3, seed=seed)
    base[0, 1, 2, 3], base[1, 0, 0, 0] = -0.0, np.nan  # kept bit for bit where not masked
    masks = rng.random((6, *HW)) < 0.2
    rows = np.sort(rng.integers(0, 3, 20)), rng.integers(0, 6, 20), rng.integers(0, 6, 20)
    return base, masks, rows


@pytest.mark.parametrize("value", [0.0, [0.5, -1.0, 2.0]])
def test_torch_engine_builds_masked_copies_that_run_like_host_built_ones(chunked, value):
    """Same copies in the same chunks (20 rows at most 3 a call): the outputs equal run() on host-built copies
    bit for bit, with a scalar or a per-channel fill, and a second mask set replaces the first on the device."""
    from certinfer.runtime.defenses.doublemask import masked_copies

    engine = load_engine(chunked[0], "torch", builder=build)
    base, masks, (f, a, b) = _masked_inputs()
    value = np.asarray(value, dtype=np.float32)
    for m in (masks, ~masks):
        expected = engine.run(masked_copies(base, m[a] | m[b], f, value))
        np.testing.assert_array_equal(engine.run_masked(base, m, f, a, b, value), expected)
    with pytest.raises(EngineError, match="do not fit"):
        engine.run_masked(base, masks[:, :4], f, a, b, value)
    with pytest.raises(EngineError, match="float32"):
        engine.run_masked(base.astype(np.float64), masks, f, a, b, value)


def test_torch_engine_refuses_weights_that_do_not_fit(single):
    with pytest.raises(EngineError, match="does not fit the model"):
        load_engine(single[0], "torch", builder=lambda config: TinyNet(width=5))


def test_torch_engine_needs_a_builder_and_engines_report_their_precision(single):
    bundle, _ = single
    with pytest.raises(EngineError, match="needs a model builder"):
        load_engine(bundle, "torch")  # the runtime has no model code: the caller passes it
    assert load_engine(bundle, "torch", builder=build).precision == "fp32"
    assert load_engine(bundle, "torch", builder=build, fp16=True).precision == "fp16"
    assert load_engine(bundle, "onnxruntime-cpu").precision == "fp32"
    assert load_engine(bundle, "onnxruntime-cpu", fp16=True).precision == "fp32"  # only the TensorRT EP takes fp16


# --- GPU backends: run wherever they exist ----------------------------------------------------------------

@pytest.mark.skipif(not HAS_TORCH_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["torch-cuda", "torch-cuda-graphs"])
def test_torch_cuda_masked_copies_built_on_the_gpu_run_like_host_built_ones(chunked, backend):
    from certinfer.runtime.defenses.doublemask import masked_copies

    engine = load_engine(chunked[0], backend, builder=build)
    base, masks, (f, a, b) = _masked_inputs()
    value = np.float32(0.5)
    np.testing.assert_array_equal(engine.run_masked(base, masks, f, a, b, value),
                                  engine.run(masked_copies(base, masks[a] | masks[b], f, value)))


@pytest.mark.skipif(not HAS_TORCH_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("backend", ["torch-cuda", "torch-cuda-graphs"])
def test_torch_cuda_parity(single, backend):
    bundle, model = single
    engine = load_engine(bundle, backend, builder=build)
    assert engine.name == backend
    for n in (5, 5, 20):  # the graphs backend captures per batch size and replays
        x = frames(n, seed=n)
        np.testing.assert_allclose(engine.run(x), reference(model, x), atol=1e-4, rtol=0)


@pytest.mark.skipif(not HAS_ORT_CUDA, reason="onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)")
def test_onnxruntime_cuda_parity(single):
    bundle, model = single
    try:
        engine = load_engine(bundle, "onnxruntime-cuda")
    except EngineError as err:
        pytest.skip(f"no CUDA GPU: {err}")
    x = frames(5)
    np.testing.assert_allclose(engine.run(x), reference(model, x), atol=1e-4, rtol=0)


@pytest.mark.skipif(not HAS_ORT_TRT, reason="onnxruntime has no TensorrtExecutionProvider")
def test_onnxruntime_tensorrt_parity(single, tmp_path):
    bundle, model = single
    try:
        engine = load_engine(bundle, "onnxruntime-tensorrt", cache_dir=tmp_path)
    except EngineError as err:
        pytest.skip(f"no CUDA GPU or TensorRT libraries: {err}")
    x = frames(5)
    np.testing.assert_allclose(engine.run(x), reference(model, x), atol=1e-3, rtol=0)
    assert engine.precision == "fp32"
    assert load_engine(bundle, "onnxruntime-tensorrt", cache_dir=tmp_path, fp16=True).precision == "fp16"


def test_native_tensorrt_parity_and_refusal(single, tmp_path):
    pytest.importorskip("tensorrt", reason=TRT_SKIP)
    from certinfer.export.tensorrt_build import build_plan, make_profile

    if not has_gpu():
        pytest.skip("no CUDA GPU")
    bundle, model = single
    onnx = bundle.read(bundle.engines()[0])
    plan, _ = build_plan(onnx, make_profile("x", (3, *HW), [1, 4]), "fp32", tmp_path / "timing.cache")
    entry = {"file": "model.plan", "format": "tensorrt", "precision": "fp32", "batch": [1, 4],
             "gpu": gpu_name(), "tensorrt_version": TRT}
    with_plan, _ = make_bundle(tmp_path / "b", {"width": 4}, extra_engines=[entry], extra_files={"model.plan": plan})
    for backend in ("tensorrt", "auto"):
        engine = load_engine(with_plan, backend)
        assert engine.name == "tensorrt" and engine.max_batch == 4 and engine.precision == "fp32"
        x = frames(10)  # chunked 4 + 4 + 2
        np.testing.assert_allclose(engine.run(x), reference(model, x), atol=1e-3, rtol=0)
    foreign = dict(entry, gpu="Some Other GPU")
    other, _ = make_bundle(tmp_path / "c", {"width": 4}, extra_engines=[foreign], extra_files={"model.plan": plan})
    with pytest.raises(EngineError, match="rebuild the plan"):
        load_engine(other, "tensorrt")
