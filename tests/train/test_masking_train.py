"""Robust masking (PatchGuard) training and export: BagNet layouts and presets, the DRS base classifier's ablation
encoding, the manifest contract of masking bundles, and a tiny trained BagNet and DRS exported end to end."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import certinfer
from certinfer.export.exporter import cpu_session
from certinfer.export.masking import ablation_probe, defense_params, export_masking, load_network, parse_clip
from certinfer.export.onnx_export import export_onnx
from certinfer.export.probe import ProbeError
from certinfer.runtime import ablation
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.geometry import Geometry
from certinfer.train import data as datasets
from certinfer.train.models.bagnet import LocalLogits, bagnet_kernels, bagnet_loss, build_bagnet
from certinfer.train.models.drs import DRSConfig, DRSNet, encode, multiply_adds
from certinfer.train.masking import PRESETS, TrainConfig, build, drs_metrics, model_geometry, train

torch.set_num_threads(1)

CLASSES = (1, 12, 13, 38)  # speed limit 30, priority road, yield, keep right
TINY_BAGNET = dict(kernels=(3, 3, 3, 1), strides=(1, 1, 2, 1), widths=(16, 16, 32, 32), stem_width=16)  # RF 9
TINY_DRS = dict(widths=(8, 16, 32), blocks=(1, 1, 1), strides=(1, 2, 2), stem_width=8)
PAPER_STRIDES = (2, 1, 2, 1, 2, 1, 1, 1)


# --- models and presets ------------------------------------------------------------------------------------

def test_bagnet_kernels_reach_receptive_fields_9_17_33():
    for rf, kernels in ((9, (3, 3, 1, 1, 1, 1, 1, 1)), (17, (3, 3, 1, 3, 1, 1, 1, 1)), (33, (3, 3, 1, 3, 1, 3, 1, 1))):
        assert bagnet_kernels(rf, PAPER_STRIDES) == kernels
        g = build_bagnet(2, dict(kernels=kernels, strides=PAPER_STRIDES, widths=(4,) * 8, stem_width=4)) \
            .cfg.geometry((192, 192))
        assert g["rf"] == [rf, rf] and g["stride"] == [8, 8] and g["output_hw"] == [24, 24]
    assert bagnet_kernels(9, (1, 1, 2, 1, 1, 1, 1, 1)) == (3, 3, 3, 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="no kernel layout"):
        bagnet_kernels(10, PAPER_STRIDES)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_match_their_geometry(preset):
    cfg = PRESETS[preset]
    model_cfg = dict(cfg.model)
    if "paper" in preset or preset.startswith("bagnet") and "cpu" not in preset:  # GPU models: a narrow twin
        model_cfg.update(widths=(4,) * len(model_cfg["widths"]), stem_width=4)
    twin = TrainConfig(**{**asdict(cfg), "model": model_cfg})
    net = build(twin, 7).eval()
    g = model_geometry(twin, net)
    with torch.no_grad():
        if cfg.network == "bagnet":
            assert net(torch.zeros(1, 3, *cfg.input_hw)).shape == (1, 7) + g.output_hw
        else:
            assert net(torch.zeros(1, 4, *cfg.input_hw)).shape == (1, 7)
            assert g == ablation.geometry(cfg.input_hw, "column", 4, 1) and g.output_hw == (1, 35)
    if preset.endswith("-cpu"):
        assert cfg.input_hw == (32, 32)  # native resolution, no upsampling
        if cfg.network == "bagnet":
            assert g.rf == (9, 9) and g.stride == (2, 2)
        else:
            assert multiply_adds(net, (4, 32, 32)) <= 30e6  # <= 60 MFLOP per ablation
    if preset in ("bagnet-paper", "bagnet17-cifar10"):
        assert g.rf == (17, 17) and cfg.input_hw == (192, 192) and cfg.upsample == "bilinear"
    if preset == "drs-paper":
        assert cfg.model["blocks"] == (2, 2, 2, 2) and cfg.model["widths"] == (64, 128, 256, 512)


def test_bagnet_loss_is_cross_entropy_on_mean_local_logits():
    z = torch.randn(3, 5, 4, 4)
    y = torch.tensor([0, 2, 4])
    assert torch.allclose(bagnet_loss(z, y), torch.nn.functional.cross_entropy(z.mean(dim=(2, 3)), y))


def test_drs_encoding_and_ablated_pixels_have_no_effect():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    inp = torch.from_numpy(rng.uniform(0, 1, size=(4, 4, 32, 32)).astype(np.float32))
    inp[:, 3] = torch.from_numpy(np.array(ablation.masks(ablation.geometry((32, 32), "column", 4)))[[0, 5, 17, 34]])
    e = encode(inp)
    keep = inp[:, 3:4] > 0
    assert torch.equal(e[:, :3], torch.where(keep, inp[:, :3], 0)) and torch.equal(e[:, 3:], torch.where(keep, 1 - inp[:, :3], 0))
    net = DRSNet(DRSConfig(num_classes=5, **TINY_DRS)).eval()
    for mode, size, stride in (("column", 4, 1), ("block", 8, 8)):
        g = ablation.geometry((32, 32), mode, size, stride)
        rows = torch.from_numpy(ablation.batch(rng.uniform(0, 1, size=(2, 3, 32, 32)).astype(np.float32), g))
        other = rows.clone()
        noise = torch.from_numpy(rng.uniform(0, 1, size=other[:, :3].shape).astype(np.float32))
        other[:, :3] = torch.where(rows[:, 3:4] > 0, rows[:, :3], noise)  # new values for every ablated pixel
        assert not torch.equal(other, rows)
        with torch.no_grad():
            assert torch.equal(net(rows), net(other))
            kept = rows.clone()
            kept[:, :3] = torch.where(rows[:, 3:4] > 0, noise, rows[:, :3])
            assert not torch.equal(net(rows), net(kept))


def test_drs_metrics_votes_and_certificate():
    g = ablation.geometry((32, 32), "column", 4)  # 35 bands; a 5-wide patch touches 8
    logits = np.zeros((2, 35, 3), np.float32)
    logits[0, :, 0] = 1  # 35 votes for class 0: gap 35 > 16
    logits[1, :20, 1] = 1  # 20 vs 15: gap 5, not certified
    logits[1, 20:, 2] = 1
    m = drs_metrics(logits, np.array([0, 1]), g, "5x5")
    assert m["affected"] == 8 and m["clean"] == 1.0 and m["drs_certified"] == 0.5


# --- the manifest contract ---------------------------------------------------------------------------------

def test_defense_params_per_variant():
    ab = {"mode": "column", "size": 4, "stride": 1}
    assert defense_params("mask-bn", "bagnet") == {"variant": "mask-bn", "source": "local-logits",
                                                   "feature": "logits", "threshold": 0.0, "clip": [0.0, None]}
    assert defense_params("cbn", "bagnet") == {"variant": "cbn", "source": "local-logits", "feature": "logits",
                                               "threshold": 1.0, "clip": "tanh"}
    assert defense_params("mask-ds", "drs", ab) == {"variant": "mask-ds", "source": "ablation",
                                                    "feature": "confidence", "threshold": 0.0, "clip": [0.0, 1.0],
                                                    "ablation": ab}
    assert defense_params("drs", "drs", ab) == {"variant": "drs", "source": "ablation", "feature": "prediction",
                                                "threshold": 1.0, "clip": [0.0, 1.0], "abstain": 0.0,
                                                "ablation": ab}
    p = defense_params("mask-ds", "drs", ab, feature="prediction", threshold=0.2, abstain=0.3)
    assert (p["feature"], p["threshold"], p["abstain"]) == ("prediction", 0.2, 0.3)
    assert defense_params("mask-bn", "bagnet", clip=parse_clip("0,5"))["clip"] == [0.0, 5.0]
    assert parse_clip("0,inf") == [0.0, None] and parse_clip("TANH") == "tanh"
    with pytest.raises(ValueError, match="needs a local-logits network"):
        defense_params("mask-bn", "drs", ab)
    with pytest.raises(ValueError, match="prediction feature only"):
        defense_params("mask-bn", "bagnet", abstain=0.5)
    with pytest.raises(ValueError, match="threshold"):
        defense_params("cbn", "bagnet", threshold=1.5)


def test_ablation_probe_catches_a_leaking_base_classifier():
    class Leaky(torch.nn.Module):  # ignores the mask: every pixel reaches the logits
        def forward(self, inp):
            return inp[:, :3].mean(dim=(2, 3))

    g = ablation.geometry((16, 16), "column", 4)
    x01 = np.random.default_rng(0).uniform(0, 1, size=(2, 3, 16, 16)).astype(np.float32)
    run = (lambda b: Leaky()(torch.from_numpy(b)).numpy())
    with pytest.raises(ProbeError, match="ablated pixels"):
        ablation_probe(run, x01, g, trials=4)
    # on onnxruntime, as bundles run: torch's own CPU convolutions give some weights batch-dependent bits
    tiny = DRSNet(DRSConfig(num_classes=3, **TINY_DRS)).eval()
    session = cpu_session(export_onnx(tiny, (torch.zeros(1, 4, 16, 16),), ["input"], ["logits"]))
    report = ablation_probe(lambda b: session.run(None, {"input": b})[0], x01, g, trials=8)
    assert report["bit_exact"] and report["kept_pixel_changes_that_changed_outputs"] > 0


# --- a tiny BagNet and DRS, trained and exported -----------------------------------------------------------

def _write_folder(root: Path, split: datasets.Split, per_class: int) -> None:
    for c in CLASSES:
        folder = root / f"{c:02d}"
        folder.mkdir(parents=True)
        for i, k in enumerate(np.flatnonzero(split.y == c)[:per_class]):
            Image.fromarray(split.x[k]).save(folder / f"{i:04d}.png")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gtsrb_root):
    torch.set_num_threads(1)
    root = gtsrb_root
    data = tmp_path_factory.mktemp("gtsrb4")
    _write_folder(data / "train", datasets.load("gtsrb:train", root), 250)
    _write_folder(data / "test", datasets.load("gtsrb:test", root), 30)
    runs = {}
    for network, model, epochs in (("bagnet", TINY_BAGNET, 15), ("drs", TINY_DRS, 20)):
        out = tmp_path_factory.mktemp(network)
        cfg = TrainConfig(network=network, dataset=f"folder:{data}", model=dict(model), epochs=epochs,
                          batch_size=64, lr=3e-3, warmup_epochs=0.5, bf16=False, eval_every=100)
        metrics = train(cfg, out, device="cpu", preset="tiny", command="pytest")
        variant = "mask-bn" if network == "bagnet" else "mask-ds"
        bundle = tmp_path_factory.mktemp("bundle") / variant
        manifest = export_masking(out / "model.safetensors", bundle, variant, threat="5x5", probe_trials=16,
                                  max_batch=256)
        runs[network] = {"metrics": metrics, "checkpoint": out / "model.safetensors", "bundle": bundle,
                         "manifest": manifest}
    runs["test"] = datasets.load(f"folder:{data}/test")
    return runs


@pytest.mark.slow
def test_tiny_networks_learn(trained):
    assert trained["bagnet"]["metrics"]["test"]["clean"] > 0.6, trained["bagnet"]["metrics"]["test"]
    drs = trained["drs"]["metrics"]["test"]
    assert drs["clean"] > 0.45 and 0 < drs["base"] <= 1 and drs["drs_certified"] <= drs["clean"], drs


@pytest.mark.slow
@pytest.mark.parametrize("network", ["bagnet", "drs"])
def test_manifest_matches_the_masking_contract(trained, network):
    run = trained[network]
    m = load_bundle(run["bundle"]).manifest  # hashes verified
    assert m == json.loads(json.dumps(m)) and m["defense"]["kind"] == "masking" and m["threat"] == "5x5"
    params = m["defense"]["params"]
    _, meta, cfg = load_network(run["checkpoint"])
    onnx = [e for e in m["engines"] if e["format"] == "onnx"]  # other formats (torch weights) may sit beside it
    assert onnx == [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "role": "model",
                     "batch": [1, 256], "sha256": onnx[0]["sha256"]}]
    assert m["input"]["hw"] == [32, 32] and m["input"]["channels"] == 3 and m["input"]["resize"] == "bilinear"
    assert m["input"]["classes"] == [f"{c:02d}" for c in CLASSES]
    if network == "bagnet":
        assert params == {"variant": "mask-bn", "source": "local-logits", "feature": "logits", "threshold": 0.0,
                          "clip": [0.0, None]}
        assert m["geometry"] == build(cfg, 4).cfg.geometry((32, 32))
        assert m["geometry"]["rf"] == [9, 9] and m["geometry"]["output_hw"] == [16, 16]
        assert m["input"]["mean"] == pytest.approx(meta["mean"]) and m["input"]["std"] == pytest.approx(meta["std"])
    else:
        assert params == {"variant": "mask-ds", "source": "ablation", "feature": "confidence", "threshold": 0.0,
                          "clip": [0.0, 1.0], "ablation": {"mode": "column", "size": 4, "stride": 1}}
        assert m["geometry"] == ablation.geometry((32, 32), "column", 4, 1).to_dict()
        assert m["input"]["mean"] == [0.0, 0.0, 0.0] and m["input"]["std"] == [1.0, 1.0, 1.0]
    assert m["probe"]["bit_exact"] and m["probe"]["trials"] == 16 and m["probe"]["exact_backends"] == ["onnxruntime-cpu"]
    parity = m["parity"]["torch_vs_onnxruntime-cpu"]
    assert parity["max_abs_error"] <= parity["rtol"] * parity["scale"]
    prov = m["provenance"]
    assert prov["preset"] == "tiny" and prov["network"] == network and prov["commit"]
    assert prov["metrics"]["n"] == len(trained["test"].y) and 0 <= prov["metrics"]["clean_accuracy"] <= 1
    assert prov["train_metrics"]["test"]["n"] == len(trained["test"].y)


@pytest.mark.slow
def test_engine_io_and_runtime_agree_with_torch(trained):
    x_uint8 = trained["test"].x[:6]
    bagnet, meta, _ = load_network(trained["bagnet"]["checkpoint"])
    cert = certinfer.load(trained["bagnet"]["bundle"], backend="onnxruntime-cpu")
    x = cert.prepare(x_uint8)
    with torch.no_grad():
        ref = LocalLogits(bagnet)(torch.from_numpy(x)).numpy()
    local = cert.local_features(x)
    assert local.shape == (6, 16, 16, 4) and local.dtype == np.float32
    np.testing.assert_allclose(local, ref, rtol=1e-4, atol=1e-4)
    assert all(v.backend == "onnxruntime-cpu" and v.certificate.threat == "5x5" for v in cert(x_uint8))

    drs, _, cfg = load_network(trained["drs"]["checkpoint"])
    cert = certinfer.load(trained["drs"]["bundle"], backend="onnxruntime-cpu")
    x = cert.prepare(x_uint8)
    np.testing.assert_allclose(x, x_uint8.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)  # mean 0, std 1
    g = Geometry.from_dict(cert.manifest["geometry"])
    with torch.no_grad():
        ref = drs(torch.from_numpy(ablation.batch(x, g))).numpy().reshape(6, 1, 35, 4)
    out = cert.local_features(x)  # 6 x 35 ablations in chunks of the engine's max batch (256)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert len(cert(x_uint8)) == 6


@pytest.mark.slow
def test_export_cli_drs_and_cbn_variants(trained, tmp_path, capsys):
    from certinfer.cli import main

    for network, variant, extra in (("drs", "drs", ["--abstain", "0.3"]), ("bagnet", "cbn", [])):
        out = tmp_path / variant
        with pytest.raises(SystemExit) as e:
            main(["export", "masking", str(trained[network]["checkpoint"]), str(out), "--variant", variant,
                  "--threat", "2x2", "--probe-trials", "8", "--eval-limit", "20", *extra])
        assert e.value.code == 0, capsys.readouterr().err
        m = load_bundle(out).manifest
        assert m["defense"]["params"]["variant"] == variant and m["threat"] == "2x2"
        assert m["provenance"]["metrics"]["n"] == 20
    assert load_bundle(tmp_path / "drs").manifest["defense"]["params"]["abstain"] == 0.3
    assert load_bundle(tmp_path / "cbn").manifest["defense"]["params"]["clip"] == "tanh"
    with pytest.raises(SystemExit) as e:
        main(["export", "masking", str(trained["drs"]["checkpoint"]), str(tmp_path / "bad"), "--variant", "cbn"])
    assert e.value.code == 1 and "needs a local-logits network" in capsys.readouterr().err
