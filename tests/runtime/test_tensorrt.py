"""TensorRT plans: the pure parts everywhere (compatibility decision, profile, trtexec line, manifest entry, fp16
graph, parity report, the command without TensorRT), the build and run wherever TensorRT and a GPU exist."""

from __future__ import annotations

import json
import shlex
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save as save_safetensors

from certinfer.cli import main
from certinfer.export import tensorrt_build as tb
from certinfer.export.bundle_writer import write_bundle
from certinfer.export.onnx_fp16 import Fp16Error, to_fp16
from certinfer.export.parity import (backend_parity, compare_decisions, compare_outputs, engine_inputs,
                                     parity_problems, real_frames, record_parity)
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.certifier import Decision
from certinfer.runtime.engines import EngineError, load_engine, tensorrt_engine
from certinfer.runtime.engines.onnxruntime_engine import input_spec
from certinfer.runtime.engines.tensorrt_engine import NOT_INSTALLED, plan_file, plan_mismatch, slug, trt_version
from certinfer.runtime.verdict import Certificate, RectCert

torch.set_num_threads(1)

TRT_SKIP = "TensorRT is not installed here; its build and run tests run wherever it is"
HW = (16, 16)
H100, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"


def build(config: dict) -> torch.nn.Module:
    """The test classifier (conv features, pooled logits) for the torch backend."""
    torch.manual_seed(config["seed"])
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict:
    """ONNX and safetensors of one test classifier (input ``x``, 3x16x16; 4 logits)."""
    net = build({"seed": 0})
    onnx_path = tmp_path_factory.mktemp("model") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net, (torch.zeros(2, 3, *HW),), str(onnx_path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    return {"model.onnx": onnx_path, "model.safetensors": save_safetensors(net.state_dict())}


def manifest(extra_engines=()) -> dict:
    return {
        "defense": {"kind": "test-argmax", "params": {}},  # registered by conftest
        "input": {"hw": list(HW), "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3,
                  "classes": ["stop", "yield", "speed-30", "speed-50"]},
        "threat": "3x3",
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "batch": [1, 32]},
                    {"file": "model.safetensors", "format": "torch", "precision": "fp32", "batch": [1, 32]},
                    *extra_engines],
        "provenance": {"config": {"seed": 0}},
    }


@pytest.fixture
def bundle_dir(tmp_path, model_files) -> Path:
    return write_bundle(tmp_path / "bundle", manifest(), model_files)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


# --- compatibility: decided from the manifest, before TensorRT sees the plan ----------------------------------

def test_plan_mismatch_names_both_gpus_and_versions():
    entry = {"file": "model.plan", "gpu": H100, "tensorrt_version": "10.3.0"}
    assert plan_mismatch(entry, H100, "10.3.0") is None
    other_gpu = plan_mismatch(entry, A100, "10.3.0")
    assert f"built for {H100} with TensorRT 10.3.0" in other_gpu and f"has {A100} with TensorRT 10.3.0" in other_gpu
    assert "TensorRT 10.5.0" in plan_mismatch(entry, H100, "10.5.0")
    assert "built for None" in plan_mismatch({"file": "x.plan"}, H100, "10.3.0")  # no record: never trusted


def test_a_foreign_plan_is_refused_before_deserializing(tmp_path, model_files, monkeypatch):
    plan = {"file": "model.plan", "format": "tensorrt", "precision": "fp16", "batch": [1, 32], "gpu": H100,
            "tensorrt_version": "10.3.0"}
    bundle = load_bundle(write_bundle(tmp_path / "b", manifest([plan]), {**model_files, "model.plan": b"\0" * 64}))
    # pretend TensorRT 10.3.0 on an A100: the refusal must come before `import tensorrt` (absent here)
    monkeypatch.setattr(tensorrt_engine, "trt_version", lambda: "10.3.0")
    monkeypatch.setattr(tensorrt_engine, "gpu_name", lambda device_id=0: A100)
    with pytest.raises(EngineError, match=f"built for {H100} with TensorRT 10.3.0, but this machine has {A100}"):
        tensorrt_engine.TensorRTEngine(bundle, bundle.engines()[2])
    with pytest.raises(EngineError, match="rebuild the plan here"):
        load_engine(bundle, "tensorrt")
    assert load_engine(bundle).name == "onnxruntime-cpu"  # auto passes over it


def test_plan_file_names():
    assert slug(H100) == "nvidia-h100-80gb-hbm3"
    assert plan_file("model", H100, "fp16") == "model.nvidia-h100-80gb-hbm3.fp16.plan"
    assert plan_file("bounds", None, "fp32") == "bounds.fp32.plan"


# --- profile, trtexec line, manifest entry ---------------------------------------------------------------

def test_profile_covers_the_batch_range_with_a_clamped_opt_batch():
    p = tb.make_profile("x", (3, 32, 32), [1, 1024])
    assert p.batch == (1, 64, 1024) and p.shapes()[1] == (64, 3, 32, 32)
    assert tb.make_profile("x", (3, 8, 8), [1, 16]).batch == (1, 16, 16)
    assert tb.make_profile("x", (3, 8, 8), [4, 16], opt=2).batch == (4, 4, 16)
    with pytest.raises(tb.BuildError, match="free per-sample dims"):
        tb.make_profile("x", (3, "h", "w"), [1, 16])


@pytest.mark.parametrize("precision, flags", [("fp32", ["--noTF32"]), ("fp16", ["--fp16"]),
                                              ("int8", ["--int8", "--fp16", "--calib=/c/calib.cache"])])
def test_trtexec_line(precision, flags):
    p = tb.Profile("input", (3, 32, 32), (1, 64, 1024))
    argv = tb.trtexec_command(Path("/b/model.onnx"), Path("/b/model.plan"), p, precision, Path("/c/timing.cache"),
                              Path("/c/calib.cache"))
    assert argv[:6] == ["trtexec", "--onnx=/b/model.onnx", "--saveEngine=/b/model.plan",
                        "--minShapes=input:1x3x32x32", "--optShapes=input:64x3x32x32",
                        "--maxShapes=input:1024x3x32x32"]
    assert "--timingCacheFile=/c/timing.cache" in argv and argv[-len(flags):] == flags
    with pytest.raises(ValueError, match="precision 'bf16'"):
        tb.trtexec_command(Path("m"), Path("p"), p, "bf16", Path("t"))


def test_trtexec_line_reads_the_input_from_the_bundle_graph(bundle_dir):
    bundle = load_bundle(bundle_dir)
    name, dims = input_spec(bundle.read(bundle.engines()[0]))
    assert (name, dims) == ("x", (3, 16, 16))
    p = tb.make_profile(name, dims, bundle.engines()[0]["batch"])
    assert "--maxShapes=x:32x3x16x16" in tb.trtexec_command(bundle_dir / "model.onnx", bundle_dir / "m.plan", p,
                                                           "fp16", Path("t"))


def test_plan_entry_and_replacing_a_plan_for_the_same_target():
    onnx = {"file": "model.onnx", "format": "onnx", "role": "model", "sha256": "a" * 64, "batch": [1, 32]}
    p = tb.Profile("x", (3, 16, 16), (1, 32, 32))
    entry = tb.plan_entry(onnx, "model.h100.fp16.plan", "fp16", p, H100, "10.3.0", "strongly-typed")
    assert entry["batch"] == [1, 32] and entry["opt_batch"] == 32 and entry["tensorrt_version"] == "10.3.0"
    assert entry["gpu"] == H100 and entry["fp16_mode"] == "strongly-typed" and entry["source_sha256"] == "a" * 64
    m = tb.with_plan({"engines": [onnx]}, entry)
    m = tb.with_plan(m, dict(entry, file="model.h100.fp16.v2.plan"))  # rebuilt: replaces
    m = tb.with_plan(m, dict(entry, file="model.a100.fp16.plan", gpu=A100))  # another GPU: added
    assert [e["file"] for e in m["engines"]] == ["model.onnx", "model.h100.fp16.v2.plan", "model.a100.fp16.plan"]


def test_cache_paths_follow_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("CERTINFER_CACHE_DIR", str(tmp_path))
    assert tb.timing_cache_path() == tmp_path / "tensorrt" / "timing.cache"
    a = tb.calibration_cache_path("f" * 64, "gtsrb:train:512")
    assert a.parent == tmp_path / "tensorrt" and a != tb.calibration_cache_path("f" * 64, "gtsrb:train:256")


def test_calibration_batches_are_full_opt_batches():
    x = np.zeros((70, 3, 4, 4), np.float32)
    assert [len(b) for b in tb.calibration_batches(x, 32)] == [32, 32]
    with pytest.raises(tb.BuildError, match="at least 32"):
        tb.calibration_batches(x[:10], 32)


# --- the fp16 graph of a strongly typed network ------------------------------------------------------------

def test_fp16_graph_keeps_the_interface_and_the_answers(model_files):
    fp32 = Path(model_files["model.onnx"]).read_bytes()
    half = to_fp16(fp32)
    s32, s16 = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]) for m in (fp32, half))
    assert [i.type for i in s16.get_inputs()] == ["tensor(float)"] and s16.get_outputs()[0].type == "tensor(float)"
    x = np.random.default_rng(0).standard_normal((8, 3, *HW)).astype(np.float32)
    a, b = s32.run(None, {"x": x})[0], s16.run(None, {"x": x})[0]
    np.testing.assert_allclose(b, a, atol=2e-2 * np.abs(a).max(), rtol=0)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.75


def test_fp16_graph_refuses_ops_that_need_float32():
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Resize", ["x", "", "scales"], ["y"])
    scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(Fp16Error, match="Resize"):
        to_fp16(model.SerializeToString())


# --- parity -----------------------------------------------------------------------------------------------

def test_code_map_comparison_counts_unflagged_flips():
    ref = np.array([[1, 0, 3, 2]], np.uint8)  # bit 0: score, bit 1: near the threshold
    got = np.array([[1, 2, 2, 0]], np.uint8)  # cell 2 flipped with its flag, cell 3 flipped without
    r = compare_outputs(ref, got, code_maps=True)
    assert r["binary_disagreements"] == 1 and r["unflagged_flips"] == 0  # cell 3: bit 0 equal (0 vs 0)
    got[0, 0] = 0  # cell 0 flips, not flagged by the backend
    r = compare_outputs(ref, got, code_maps=True)
    assert r["binary_disagreements"] == 2 and r["unflagged_flips"] == 1 and r["binary_agreement"] == 0.5
    problems = parity_problems({"compared": {"tensorrt:model.plan": r}})
    assert len(problems) == 1 and "tensorrt:model.plan" in problems[0] and "near-threshold" in problems[0]


def test_decision_comparison():
    def d(label: int, certified: bool) -> Decision:
        return Decision(label, Certificate.from_rects("3x3", {"3x3": RectCert(certified, 1.0 if certified else -1)}))

    r = compare_decisions([d(0, True), d(1, False), d(2, True)], [d(0, True), d(1, True), d(3, False)])
    assert r["argmax_agreement"] == 2 / 3 and r["certificate_agreement"] == 1 / 3
    assert r["certified_only_by_backend"] == 1 and r["certified_only_by_reference"] == 1


def test_parity_torch_against_onnxruntime_cpu_on_real_frames(bundle_dir):
    bundle = load_bundle(bundle_dir)
    frames = real_frames(None, HW, limit=40)  # the packaged GTSRB samples, resized
    assert frames.shape == (40, *HW, 3) and frames.dtype == np.uint8
    report = backend_parity(bundle, frames, source="samples", builder=build)
    torch_cpu = report["compared"]["torch-cpu"]
    assert torch_cpu["max_abs_error"] < 1e-4 and torch_cpu["argmax_agreement"] == 1.0
    assert torch_cpu["certificate_agreement"] == 1.0 and not torch_cpu["exact"]
    assert report["frames"] == 40 and report["reference"] == "onnxruntime-cpu"
    if trt_version() is None:
        assert report["absent"]["tensorrt"] == NOT_INSTALLED
    assert set(report["compared"]) | set(report["absent"]) >= {"torch-cuda", "onnxruntime-cuda", "tensorrt"}
    assert not parity_problems(report)
    record_parity(bundle_dir, report)
    assert load_bundle(bundle_dir).manifest["parity"]["backends"]["compared"]["torch-cpu"] == torch_cpu


def test_engine_inputs_are_what_the_defense_feeds_the_engine(bundle_dir):
    import certinfer

    frames = real_frames(None, HW, limit=10)
    x = engine_inputs(load_bundle(bundle_dir), frames, limit=8, batch=4)
    want = certinfer.load(bundle_dir, backend="onnxruntime-cpu").prepare(frames[:8])
    np.testing.assert_array_equal(x, want)


# --- the command --------------------------------------------------------------------------------------------

@pytest.mark.skipif(trt_version() is not None, reason="TensorRT is installed here")
def test_export_trt_without_tensorrt_prints_trtexec_and_one_line(capsys, bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CERTINFER_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = cli(capsys, "export", "trt", str(bundle_dir), "--precision", "fp16", "--opt-batch", "8")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "TensorRT is not installed" in err and "--plan PLAN" in err
    argv = shlex.split(out.strip().splitlines()[0])
    assert argv[0] == "trtexec" and f"--onnx={bundle_dir / 'model.onnx'}" in argv and "--fp16" in argv
    assert "--optShapes=x:8x3x16x16" in argv and f"--timingCacheFile={tmp_path / 'cache/tensorrt/timing.cache'}" in argv
    assert [e["format"] for e in load_bundle(bundle_dir).manifest["engines"]] == ["onnx", "torch"]  # untouched


def test_int8_without_calibration_data_is_refused(capsys, bundle_dir):
    code, out, err = cli(capsys, "export", "trt", str(bundle_dir), "--precision", "int8")
    assert code == 1 and "int8 needs calibration data" in err and "--calib-data" in err


def test_a_plan_built_outside_is_added_with_its_target(capsys, bundle_dir, tmp_path):
    plan = tmp_path / "built.plan"
    plan.write_bytes(b"plan bytes from trtexec")
    code, out, err = cli(capsys, "export", "trt", str(bundle_dir), "--out", str(tmp_path / "with_plan"), "--plan",
                         str(plan), "--gpu", H100, "--tensorrt-version", "10.3.0", "--precision", "fp32")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("trtexec ") and "--noTF32" in lines[0]
    bundle = load_bundle(tmp_path / "with_plan")  # every hash verified
    entry = json.loads(lines[-1])["engine"]
    assert entry["file"] == "model.nvidia-h100-80gb-hbm3.fp32.plan" and bundle.engines()[-1]["gpu"] == H100
    assert bundle.read(bundle.engines()[-1]) == b"plan bytes from trtexec"
    assert bundle.engines()[-1]["tensorrt_version"] == "10.3.0" and bundle.engines()[-1]["batch"] == [1, 32]
    assert "tensorrt" in bundle.manifest["parity"]["backends"]["absent"]
    code, _, err = cli(capsys, "export", "trt", str(bundle_dir), "--plan", str(plan))
    assert code == 1 and "--plan needs --gpu" in err


def test_export_parity_command(capsys, bundle_dir):
    code, out, err = cli(capsys, "export", "parity", str(bundle_dir), "--limit", "8")
    assert code == 0, err
    report = json.loads(out)
    assert report["frames"] == 8 and "torch-cpu" in report["absent"]  # no model builder for the test net here
    assert load_bundle(bundle_dir).manifest["parity"]["backends"] == report


# --- wherever TensorRT and a GPU exist ------------------------------------------------------------------------

@pytest.fixture
def trt_gpu():
    pytest.importorskip("tensorrt", reason=TRT_SKIP)
    try:
        return tensorrt_engine.gpu_name()
    except EngineError as err:
        pytest.skip(f"TensorRT is installed but there is no CUDA GPU: {err}")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_run_and_refuse(trt_gpu, bundle_dir, tmp_path, monkeypatch, precision):
    monkeypatch.setenv("CERTINFER_CACHE_DIR", str(tmp_path / "cache"))
    entry = tb.export_trt(bundle_dir, precision=precision, opt=8, echo=lambda line: None)
    assert entry["gpu"] == trt_gpu and entry["tensorrt_version"] == trt_version()
    assert (tmp_path / "cache" / "tensorrt" / "timing.cache").is_file()
    bundle = load_bundle(bundle_dir)
    engine = load_engine(bundle, "tensorrt")
    x = np.random.default_rng(0).standard_normal((40, 3, *HW)).astype(np.float32)  # chunked 32 + 8
    want = load_engine(bundle, "onnxruntime-cpu").run(x)
    np.testing.assert_allclose(engine.run(x), want, atol=1e-3 if precision == "fp32" else 5e-2, rtol=0)
    compared = bundle.manifest["parity"]["backends"]["compared"][f"tensorrt:{entry['file']}"]
    assert compared["argmax_agreement"] >= 0.9
    foreign = dict(entry, gpu="Some Other GPU")
    m = tb.with_plan({**bundle.manifest, "engines": [e for e in bundle.manifest["engines"] if e != entry]}, foreign)
    other = load_bundle(tb.rewrite_bundle(bundle, m, tmp_path / "other", {}))
    with pytest.raises(EngineError, match="built for Some Other GPU"):
        load_engine(other, "tensorrt")


def test_int8_build_with_calibration_frames(trt_gpu, bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CERTINFER_CACHE_DIR", str(tmp_path / "cache"))
    import certinfer

    entry = tb.export_trt(bundle_dir, precision="int8", opt=8, calib_data=str(certinfer.sample_frames()),
                          calib_frames=32, echo=lambda line: None)
    assert entry["precision"] == "int8" and list((tmp_path / "cache" / "tensorrt").glob("calib-*.cache"))
    assert load_engine(load_bundle(bundle_dir), "tensorrt").run(np.zeros((2, 3, *HW), np.float32)).shape == (2, 4)
