"""Benchmarks: every defense's plain reference agrees with its vectorized math; `certinfer bench latency` runs;
cropping's dataset variants read off one exhaustive pass equal their own inference."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certinfer.bench.bagcert_reference import certify_reference, condition_31_margin
from certinfer.runtime.defenses import bagcert, defense
from certinfer.runtime.geometry import Geometry
from certinfer.runtime.loader import load
from certinfer.threat import parse, rect_key

TINY = dict(kernels=(3, 1, 1, 1), strides=(1, 2, 1, 1), widths=(16, 32, 32, 32), stem_width=16)
CLASSES = ["a", "b", "c", "d"]
GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _random_case(rng):
    rf, stride = int(rng.integers(1, 8)), int(rng.integers(1, 3))
    pad = int(rng.integers(0, rf))
    n = int(rng.integers(6, 14))
    out = (n + 2 * pad - rf) // stride + 1
    g = Geometry((rf, rf), (stride, stride), (pad, pad), (n, n), (out, out))
    c = int(rng.integers(2, 6))
    p = rng.uniform(0.05, 0.4, size=c)
    p[0] = rng.uniform(0.5, 1.0)  # biased so some maps certify and some do not
    return g, (rng.random((3,) + g.output_hw + (c,)) < p).astype(np.uint8)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("condition", ["3.2", "3.3"])
def test_reference_equals_vectorized_certify(seed, condition):
    rng = np.random.default_rng(seed)
    g, s = _random_case(rng)
    threat = parse("1x1,2x3,area:6", input_hw=g.input_hw)
    labels = np.zeros(len(s), np.intp)
    uncertain = (rng.random(s.shape) < 0.05).astype(np.uint8) if seed % 2 else None
    fast = bagcert.certify(s, labels, g, threat, condition=condition, uncertain=uncertain)
    for i in range(len(s)):
        ref = certify_reference(s[i], 0, g, threat, None if uncertain is None else uncertain[i], condition)
        assert ref == fast[i]  # same flag and margin for every rectangle, and for the threat as a whole


def test_reference_condition_31_equals_32():
    rng = np.random.default_rng(3)
    g, s = _random_case(rng)
    for rect in ((1, 1), (2, 3)):
        ref = certify_reference(s[0], 0, g, parse(f"{rect[0]}x{rect[1]}"))
        assert ref.per_rect[rect_key(rect)].margin == condition_31_margin(s[0], 0, g, rect)


def _golden_frames(hw: tuple[int, int], n: int = 3) -> np.ndarray:
    """The golden frames of the model's input size, then random ones up to ``n``."""
    with np.load(GOLDEN / "frames.npz", allow_pickle=False) as f:
        frames = f[f"{hw[0]}x{hw[1]}"][:n]
    extra = np.random.default_rng(0).integers(0, 256, (n - len(frames), *hw, 3), dtype=np.uint8)
    return np.concatenate([frames, extra])


@pytest.mark.parametrize("name, threat", [("bagcert", None), ("masking-bn", None), ("masking-ds", None),
                                          ("cropping-sample", None), ("cropping-exhaustive", None),
                                          ("scalecert", None), ("ibp", "2x2")])
def test_every_defense_math_equals_its_plain_reference(name: str, threat: str | None):
    """The registry's reference of each golden bundle's defense gives the runtime's certificates (and ScaleCert's
    alerts) frame for frame; the result reports the timings latency writes."""
    pytest.importorskip("torch")
    from certinfer.bench.reference import math_vs_reference

    certifier = load(GOLDEN / "bundles" / name, backend="onnxruntime-cpu", threat=threat)
    frames = _golden_frames(certifier.input_hw)
    reference = defense(certifier.name).load("reference")
    m = math_vs_reference(certifier, frames, reference, reference_frames=2, repeats=1)
    assert m["identical_certificates"] and m["frames_compared"] == 2 and m["frames_vectorized"] == 3
    assert m["defense"] == certifier.name and m["rects"] == list(certifier.threat.keys)
    assert set(m["ms_per_frame"]) == {"vectorized_batched", "vectorized_one_frame_per_call", "reference"}
    assert m["speedup"] > 0 and m["engine_counted"] == (name == "ibp")


def test_a_reference_that_disagrees_fails_the_comparison():
    from certinfer.bench.reference import math_vs_reference, plain_reference
    from certinfer.runtime.verdict import RectCert

    certifier = load(GOLDEN / "bundles" / "bagcert", backend="onnxruntime-cpu")
    plain = defense("bagcert").load("reference")

    @plain_reference()
    def off_by_one(c, frames):
        certs = plain(c, frames)
        for cert in certs:
            key = next(iter(cert.per_rect))
            cert.per_rect[key] = RectCert(cert.per_rect[key].certified, cert.per_rect[key].margin + 1)
        return certs

    with pytest.raises(AssertionError, match="vectorized and reference bagcert certificates differ"):
        math_vs_reference(certifier, _golden_frames(certifier.input_hw, 2), off_by_one, reference_frames=1)


def test_cropping_variants_read_off_one_exhaustive_pass_equal_their_own_inference():
    """A sampled variant certified from the exhaustive pass's predictions draws the crops its own seeded inference
    draws, so its decisions are those of running it; the exhaustive variants are the pass's own."""
    from certinfer.bench.certify import cropping_variants

    base = load(GOLDEN / "bundles" / "cropping-sample", backend="onnxruntime-cpu")
    source = base.with_options(exhaustive=True)
    frames = _golden_frames(base.input_hw)
    variants = cropping_variants(source, "3x1", seed=7)
    assert next(iter(variants)) == "r128" and {"nr64", "r128-p0.99", "exhaustive@shapes"} <= set(variants)
    assert "nr512" not in variants  # more crops than locations cannot be drawn without replacement
    assert {v.infer_key() for v in variants.values()} == {source.infer_key()}  # one engine pass
    features, _ = source.timed_features(frames)
    for name in ("r64", "nr128", "r128-p0.93", "r128@shapes", "exhaustive", "exhaustive@shapes"):
        got = variants[name].certify(features)
        own = variants[name].variant
        want = own.certify(own.infer(own.prepare(frames))) if own.options.exhaustive else \
            own.seeded(7).certify(own.seeded(7).infer(own.prepare(frames)))
        assert [(d.label, d.certificate) for d in got] == [(d.label, d.certificate) for d in want], name


@pytest.fixture(scope="module")
def bagcert_bundle(tmp_path_factory) -> Path:
    """A real (untrained, random-weight) BagCert bundle: enough for timing."""
    torch = pytest.importorskip("torch")
    from certinfer.export.bundle_writer import write_bundle
    from certinfer.export.onnx_export import export_onnx
    from certinfer.train.bagcert import build_scorer
    from certinfer.train.models.bagcert import CodeMap

    torch.set_num_threads(1)
    torch.manual_seed(0)
    scorer = build_scorer(len(CLASSES), TINY).eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but fast for a test model
        warnings.simplefilter("ignore")
        model = export_onnx(CodeMap(scorer, 0.05), (torch.zeros(2, 3, 16, 16),), ["input"], ["scores"])
    manifest = {
        "defense": {"kind": "bagcert", "params": {"condition": "3.2", "tolerance": 0.05}},
        "input": {"hw": [16, 16], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": CLASSES,
                  "resize": "bilinear"},
        "geometry": scorer.cfg.geometry((16, 16)),
        "threat": "3x3",
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "role": "model", "batch": [1, 8]}],
        "probe": {"exact_backends": ["onnxruntime-cpu"]},
        "provenance": {"dataset": "none", "commit": "test"},
    }
    return write_bundle(tmp_path_factory.mktemp("bench") / "tinybag", manifest, {"model.onnx": model})


def test_latency_cli_writes_results(bagcert_bundle: Path, tmp_path: Path, capsys):
    from certinfer.cli import main

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in CLASSES[:2]:
        (data / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as e:
        main(["bench", "latency", str(bagcert_bundle), "--backend", "onnxruntime-cpu", "--backend", "torch-cpu",
              "--frames", "3", "--batches", "1,4,12", "--seconds", "0", "--threads", "1", "--vectorized-frames", "4",
              "--reference-frames", "2", "--data", f"folder:{data}", "--limit", "5",
              "--out", str(out / "latency-tinybag.json"), "--threat", "3x3,2x2"])
    captured = capsys.readouterr()
    assert e.value.code == 0, captured.err
    paths = json.loads(captured.out.strip().splitlines()[-1])
    assert paths == {"json": str(out / "latency-tinybag.json"), "png": str(out / "latency-tinybag.png")}
    r = json.loads(Path(paths["json"]).read_text())
    assert {"machine", "versions", "commit", "date", "bundle", "settings", "note", "backends", "math_vs_reference",
            "dataset", "targets", "peak_rss_mib"} <= set(r)
    assert {"cpu", "cores"} <= set(r["machine"]) and {"python", "numpy", "onnxruntime"} <= set(r["versions"])
    assert "torch engine" in r["backends"]["torch-cpu"]["skipped"]  # the bundle has no torch entry
    cpu = r["backends"]["onnxruntime-cpu"]
    assert cpu["engine"] == "onnxruntime-cpu" and cpu["batch1"]["frames"] == 3
    assert {"prepare", "engine", "certify", "total"} == set(cpu["batch1"]["stages_ms"])
    assert {"p50", "p90", "p99"} <= set(cpu["batch1"]["stages_ms"]["certify"])
    assert [p["batch"] for p in cpu["batches"]] == [1, 4, 12]  # 12 > the engine's max batch 8: chunked
    assert cpu["best_batch"]["batch"] in (1, 4, 12) and cpu["peak_rss_mib"] > 0
    assert cpu["expansion"] is None  # one engine input per frame
    assert cpu["dataset"]["n"] == 5 and r["dataset"]["onnxruntime-cpu"]["images_per_second"] > 0
    m = r["math_vs_reference"]
    assert m["identical_certificates"] and m["frames_compared"] == 2 and m["rects"] == ["3x3", "2x2"]
    assert m["speedup"] > 0 and set(m["ms_per_frame"]) == {"vectorized_batched", "vectorized_one_frame_per_call",
                                                            "reference"}
    assert any("5%" in t["target"] for t in r["targets"])
    assert Path(paths["png"]).stat().st_size > 1000
    assert "math (3x3,2x2)" in captured.err
    from certinfer.bench.plots import markdown_table

    assert "| tinybag | bagcert |" in markdown_table([r]).splitlines()[2]
    certify = {"bundle": str(bagcert_bundle), "data": "folder:x", "n": 5, "threat": "3x3,2x2",
               "certified_accuracy": {"3.2": 0.4, "3.3": 0.2}}
    (out / "bagcert-tiny.json").write_text(json.dumps(certify))
    elsewhere = dict(r, machine={**r["machine"], "gpus": [{"name": "Test GPU"}]})  # the same run, another machine
    (out / "latency-elsewhere.json").write_text(json.dumps(elsewhere))
    with pytest.raises(SystemExit) as e:
        main(["bench", "summary", "--results", str(out)])
    captured = capsys.readouterr()
    assert e.value.code == 0, captured.err
    assert "tinybag: certified accuracy 0.400 (3.2, folder:x, bagcert-tiny.json)" in captured.out
    pngs = [Path(p) for p in json.loads(captured.out.strip().splitlines()[-1])]
    assert len(pngs) == 4 and sum(p.name.endswith("-test-gpu.png") for p in pngs) == 2  # one pair per machine
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_latency_of_a_cropping_bundle_on_onnxruntime_and_torch(tmp_path: Path):
    """Randomized cropping with a torch engine: both backends measured, crop building timed apart from the engine,
    and the loop reference gives identical certificates."""
    torch = pytest.importorskip("torch")
    from certinfer.bench.latency import LatencyOptions, run_latency
    from certinfer.export.bundle_writer import write_bundle
    from certinfer.export.onnx_export import export_onnx
    from certinfer.export.torch_weights import torch_engine
    from certinfer.train import models

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = models.config("cropnet", len(CLASSES),
                           dict(input_hw=(16, 16), crop_hw=(8, 8), widths=(4, 4, 8, 8)), (5, 8, 8))
    net = models.build(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = export_onnx(net, (torch.zeros(2, 5, 8, 8),), ["input"], ["logits"])
    entry, weights = torch_engine(net, config, 256)
    manifest = {
        "defense": {"kind": "cropping", "params": {"crop": [8, 8], "crops": 16, "replace": True, "mode": "sample",
                                                   "threshold": 0.95}},
        "input": {"hw": [16, 16], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": CLASSES},
        "threat": "2.4%",  # a percentage: parsed against the input size (a 3x3 patch here)
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "batch": [1, 256]}, entry],
        "provenance": {"commit": "test"},
    }
    bundle = write_bundle(tmp_path / "tinycrop", manifest, {"model.onnx": model, "model.safetensors": weights})
    options = LatencyOptions(backends=("onnxruntime-cpu", "torch-cpu"), frames=3, batches=(1, 4), seconds=0.0,
                             threads=1, vectorized_frames=4, reference_frames=2, note="test")
    r = run_latency(bundle, options, progress=False)
    assert {r["backends"][b]["engine"] for b in ("onnxruntime-cpu", "torch-cpu")} == {"onnxruntime-cpu", "torch-cpu"}
    e = r["backends"]["torch-cpu"]["expansion"]
    assert e["engine_inputs_per_frame"] == 16 and e["build_over_engine"] > 0
    m = r["math_vs_reference"]
    assert m["defense"] == "cropping" and m["identical_certificates"] and m["frames_compared"] == 2
    assert any("engine inputs built" in t["target"] for t in r["targets"])
    assert r["conditions"] == "test" and len(r["load_average"]["end"]) == 3 and m["rects"] == ["3x3"]
    from certinfer.export.parity import backend_parity
    from certinfer.runtime.bundle import load_bundle

    frames = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    parity = backend_parity(load_bundle(bundle), frames, backends=("torch-cpu",))["compared"]["torch-cpu"]
    assert parity["argmax_agreement"] == 1.0 and parity["max_abs_error"] < 1e-4  # same seeded crops on both


def test_latency_cli_rejects_unknown_backends_and_bad_batches(bagcert_bundle: Path, tmp_path: Path, capsys):
    from certinfer.cli import main

    for args, code, msg in ((["--backend", "nope"], 1, "unknown backend"), (["--batches", "0,2"], 2, "positive")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "latency", str(bagcert_bundle), "--out", str(tmp_path / "r.json"), *args])
        err = capsys.readouterr().err
        assert e.value.code == code and msg in err and err.count("\n") == 1
