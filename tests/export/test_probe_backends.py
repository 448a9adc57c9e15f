"""The receptive-field probe on every backend that can run a bundle here (``certinfer inspect --probe``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import certinfer
from certinfer.cli import main
from certinfer.export import probe as probe_module
from certinfer.export.bundle_writer import reseal, write_bundle
from certinfer.export.probe import ONNX_BACKENDS, TORCH_BACKENDS, candidate_backends, probe_bundle
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.engines import EngineError, load_engine

PROVIDERS = {"onnxruntime-cpu": "CPUExecutionProvider", "onnxruntime-cuda": "CUDAExecutionProvider",
             "onnxruntime-tensorrt": "TensorrtExecutionProvider"}
TINY = dict(kernels=(3, 1), strides=(1, 2), widths=(8, 8), stem_width=8)  # RF 5, stride 2


def inspect_probe(capsys, bundle: Path, *extra: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--probe", "--trials", "16", str(bundle), *extra])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_default_bundle_is_probed_on_every_onnxruntime_provider_and_torch():
    reports = probe_bundle(certinfer.default_bundle(), trials=16)
    assert list(reports) == [*ONNX_BACKENDS, *TORCH_BACKENDS] == \
        candidate_backends(load_bundle(certinfer.default_bundle()))
    torch_cpu = reports["torch-cpu"]  # its torch engine, rebuilt by certinfer.train.models.build where torch is
    assert torch_cpu["status"] == "passed" or "torch" in torch_cpu.get("reason", ""), torch_cpu
    assert not torch_cpu.get("listed_exact")
    cpu = reports["onnxruntime-cpu"]
    assert cpu["status"] == "passed" and cpu["listed_exact"]
    assert cpu["checks"]["outputs"]["trials"] == 16 and cpu["checks"]["preactivation"]["op"] == "GreaterOrEqual"
    for name in ONNX_BACKENDS[1:]:
        if PROVIDERS[name] not in ort.get_available_providers():
            assert reports[name]["status"] == "skipped" and PROVIDERS[name] in reports[name]["reason"]
        else:  # a GPU machine: it runs, and must pass or say why it could not
            assert reports[name]["status"] in ("passed", "skipped"), reports[name]


class LeakyEngine:
    """The real engine, but one output cell also depends on every input pixel (a kernel that mixes too much)."""

    def __init__(self, inner, name: str = "leaky"):
        self.inner, self.name, self.max_batch = inner, name, inner.max_batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self.inner.run(batch).copy()
        out[:, 0, 0, 0] ^= (np.abs(batch).sum(axis=(1, 2, 3)) * 1e3).astype(np.int64).astype(np.uint8) & 1
        return out


@pytest.fixture
def with_leaky_backend(monkeypatch):
    def fake_load_engine(bundle, backend, **options):
        if backend == "leaky":
            return LeakyEngine(load_engine(bundle, "onnxruntime-cpu"))
        if backend == "leaky-listed":  # claims a name the manifest lists in probe.exact_backends
            return LeakyEngine(load_engine(bundle, "onnxruntime-cpu"), "onnxruntime-cpu")
        if backend == "nowhere":
            raise EngineError("nowhere is not installed")
        return load_engine(bundle, backend, **options)

    monkeypatch.setattr(probe_module, "load_engine", fake_load_engine)
    monkeypatch.setattr(probe_module, "candidate_backends", lambda bundle: ["onnxruntime-cpu", "leaky", "nowhere"])


def test_an_unlisted_backend_that_fails_is_reported_but_expected(capsys, with_leaky_backend):
    code, out, err = inspect_probe(capsys, certinfer.default_bundle())
    assert code == 0, err
    assert "probe       onnxruntime-cpu: passed (outputs: 16 random patches, preactivation (GreaterOrEqual" in out
    assert "probe       leaky: not bit-exact (output cell" in out and "does not trust it" in out
    assert "probe       nowhere: skipped (nowhere is" in out


def test_a_listed_backend_that_fails_fails_inspect_probe(capsys, monkeypatch, with_leaky_backend):
    monkeypatch.setattr(probe_module, "candidate_backends", lambda bundle: ["leaky-listed", "nowhere"])
    code, out, err = inspect_probe(capsys, certinfer.default_bundle())
    assert code == 1
    assert "probe       leaky-listed: FAILED: output cell" in out
    assert err.count("\n") == 1 and err.startswith("certinfer: error: probe failed on leaky-listed: ")


def test_inspect_probe_fails_when_no_backend_could_run(capsys, monkeypatch, with_leaky_backend):
    monkeypatch.setattr(probe_module, "candidate_backends", lambda bundle: ["nowhere"])
    code, out, err = inspect_probe(capsys, certinfer.default_bundle())
    assert code == 1 and "could not run on any backend here: nowhere: nowhere is not installed" in err


def test_a_bundle_without_geometry_is_probed_for_batch_independence_only(capsys, tiny_bundle: Path):
    code, out, err = inspect_probe(capsys, tiny_bundle)
    assert code == 0, err
    assert ("probe       onnxruntime-cpu: passed (outputs not checked: the bundle has no geometry: nothing local to "
            "probe): batch-invariant\n") in out


# --- a bundle with an ONNX and a torch engine ------------------------------------------------------------

def _builder(config: dict):
    from certinfer.export.bagcert import CodeMap
    from certinfer.train.bagcert import build_scorer

    return CodeMap(build_scorer(3, config), 0.05).eval()


@pytest.fixture(scope="module")
def two_engine_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    from certinfer.export.onnx_export import export_onnx
    from certinfer.runtime.geometry import Geometry

    torch.manual_seed(0)
    code_map = _builder(TINY)
    geometry = Geometry(**code_map.scorer.cfg.geometry((16, 16)))
    model = export_onnx(code_map, (torch.zeros(2, 3, 16, 16),), ["input"], ["scores"])
    weights = save({k: v.contiguous() for k, v in code_map.state_dict().items()})
    manifest = {
        "defense": {"kind": "bagcert", "params": {"condition": "3.2", "tolerance": 0.05}},
        "input": {"hw": [16, 16], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["a", "b", "c"]},
        "geometry": geometry.to_dict(), "threat": "3x3",
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "batch": [1, 64]},
                    {"file": "model.safetensors", "format": "torch", "precision": "fp32", "batch": [1, 64],
                     "config": TINY}],
        "probe": {"op": "GreaterOrEqual", "exact_backends": ["onnxruntime-cpu"]},
        "provenance": {"commit": "test"},
    }
    root = tmp_path_factory.mktemp("two") / "bundle"
    return write_bundle(root, manifest, {"model.onnx": model, "model.safetensors": weights})


def test_torch_backends_are_probed_where_the_bundle_has_a_torch_engine(two_engine_bundle: Path):
    import torch

    reports = probe_bundle(two_engine_bundle, trials=16, builder=_builder)
    assert list(reports) == [*ONNX_BACKENDS, *TORCH_BACKENDS]
    assert reports["onnxruntime-cpu"]["status"] == "passed" and reports["onnxruntime-cpu"]["listed_exact"]
    torch_cpu = reports["torch-cpu"]
    assert torch_cpu["status"] == "passed", torch_cpu
    assert set(torch_cpu["checks"]) == {"outputs"} and not torch_cpu["listed_exact"]
    if not torch.cuda.is_available():
        assert all(reports[b]["status"] == "skipped" and "CUDA" in reports[b]["reason"] for b in TORCH_BACKENDS[1:])
    # without a builder the torch engine cannot rebuild the module: skipped, saying so
    without = probe_bundle(two_engine_bundle, trials=4, backends=["torch-cpu"])
    assert without["torch-cpu"]["status"] == "skipped" and "builder" in without["torch-cpu"]["reason"]


def test_an_edited_geometry_fails_on_every_backend_that_ran(two_engine_bundle: Path, tmp_path: Path):
    edited = tmp_path / "edited"
    shutil.copytree(two_engine_bundle, edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["geometry"].update(rf=[1, 1], padding=[0, 0])  # claims 1x1 cells: certificates would be unsound
    (edited / "manifest.json").write_text(json.dumps(m))
    reseal(edited)
    reports = probe_bundle(edited, trials=16, builder=_builder, backends=["onnxruntime-cpu", "torch-cpu"])
    for name in ("onnxruntime-cpu", "torch-cpu"):
        assert reports[name]["status"] == "failed" and "receptive field exceeds" in reports[name]["error"], name
