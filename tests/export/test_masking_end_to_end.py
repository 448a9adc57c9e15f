"""PatchGuard end to end on tiny models trained here: export, runtime, certify CLI, pixel-space patch attacks.

Every certifier (Mask-BN, CBN on BagNet local logits; Mask-DS, DRS on ablations) is attacked at every patch
location with random, solid, copied and PGD contents; certified labels must never flip.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import certinfer
from certinfer.bench.soundness import masking_soundness
from certinfer.export.masking import export_masking, load_network
from certinfer.runtime.defenses import masking
from certinfer.threat import parse
from certinfer.train import data as datasets
from certinfer.train.masking import TrainConfig, train

TINY_BAGNET = dict(kernels=(3, 1, 1, 1), strides=(1, 2, 1, 1), widths=(16, 32, 32, 32), stem_width=16)
TINY_DRS = dict(widths=(8, 16, 32), blocks=(1, 1, 1), strides=(1, 2, 2), stem_width=8)
THREAT = "2x2"


@pytest.fixture(scope="module")
def models(tmp_path_factory, gtsrb4):
    torch.set_num_threads(1)
    out = {}
    for network, model, epochs in (("bagnet", TINY_BAGNET, 12), ("drs", TINY_DRS, 12)):
        run = tmp_path_factory.mktemp(network)
        cfg = TrainConfig(network=network, dataset=f"folder:{gtsrb4}", model=dict(model), epochs=epochs,
                          batch_size=64, bf16=False, warmup_epochs=0.5, eval_every=100)
        train(cfg, run, device="cpu")
        out[network] = run / "model.safetensors"
    out["data"] = f"folder:{gtsrb4}/test"
    return out


@pytest.fixture(scope="module")
def bundles(models, tmp_path_factory):
    made = {}
    for variant, network in (("mask-bn", "bagnet"), ("cbn", "bagnet"), ("mask-ds", "drs"), ("drs", "drs")):
        made[variant] = tmp_path_factory.mktemp(variant) / "b"
        export_masking(models[network], made[variant], variant=variant, threat=THREAT, probe_trials=16)
    return made


@pytest.mark.slow
@pytest.mark.parametrize("variant,network,images", [("mask-bn", "bagnet", 3), ("cbn", "bagnet", 2),
                                                     ("mask-ds", "drs", 1), ("drs", "drs", 1)])
def test_certified_frames_survive_pixel_patch_attacks(models, bundles, variant, network, images):
    report = masking_soundness(bundles[variant], models[network], models["data"], images=images, threat=THREAT,
                               pgd_steps=5)
    assert report["certified_frames_attacked"] == images, f"{variant}: too few certified frames to attack"
    assert report["patched_frames_evaluated"] == images * 4 * 31 * 31
    assert report["total_flips"] == 0, report["flips"]


@pytest.mark.slow
def test_runtime_matches_masking_on_torch_local_logits(models, bundles):
    split = datasets.load(models["data"])
    cert = certinfer.load(bundles["mask-bn"], backend="onnxruntime-cpu")
    verdicts = cert(split.x[:32])
    model, _, _ = load_network(models["bagnet"])
    with torch.no_grad():
        z = model(torch.from_numpy(cert.prepare(split.x[:32]))).permute(0, 2, 3, 1).numpy()
    expected = masking.robust_predict(z, cert.geometry, parse(THREAT))
    assert [v.label for v in verdicts] == expected.tolist()
    assert all(v.certificate.kind == "recovery" and v.backend == "onnxruntime-cpu" for v in verdicts)


@pytest.mark.slow
def test_drs_bundle_runs_every_ablation_in_one_engine_call(bundles):
    cert = certinfer.load(bundles["drs"], backend="onnxruntime-cpu")
    calls = []
    run = cert.engine.run
    cert.engine.run = lambda b: calls.append(len(b)) or run(b)
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    verdicts = cert(frames)
    k = cert.geometry.output_hw[0] * cert.geometry.output_hw[1]
    assert k == 35 and len(verdicts) == 3
    assert calls == [3 * k]


@pytest.mark.slow
def test_backend_without_bit_exact_probe_does_not_certify_local_logits(bundles, models):
    split = datasets.load(models["data"])
    exact = certinfer.load(bundles["mask-bn"], backend="onnxruntime-cpu")
    manifest = copy.deepcopy(exact.manifest)
    manifest["probe"]["exact_backends"] = []  # as for an fp16 GPU engine that failed the bit-exact probe
    loose = masking.MaskingCertifier(SimpleNamespace(manifest=manifest), exact.engines, parse(THREAT))
    assert exact.trusted and not loose.trusted
    a, b = exact(split.x[:40]), loose(split.x[:40])
    assert any(v.status == "certified" for v in a)
    assert [v.label for v in a] == [v.label for v in b]
    assert all(v.status == "uncertified" and "is not verified for this bundle" in v.reason for v in b)
    # ablation locality is exact on every backend, but batch independence is not: unlisted, no certificates
    drs = certinfer.load(bundles["drs"], backend="onnxruntime-cpu")
    manifest = copy.deepcopy(drs.manifest)
    manifest["probe"]["exact_backends"] = []
    unlisted = masking.MaskingCertifier(SimpleNamespace(manifest=manifest), drs.engines, parse(THREAT))
    assert drs.trusted and not unlisted.trusted and unlisted.needs_exact
    a, b = drs(split.x[:8]), unlisted(split.x[:8])
    assert [v.label for v in a] == [v.label for v in b] and not any(v.certificate.certified for v in b)


@pytest.mark.slow
def test_certify_cli_reports_every_variant_and_threat(bundles, models, tmp_path, capsys):
    from certinfer.cli import main

    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        main(["certify", str(bundles["mask-bn"]), "--data", models["data"], "--out", str(out),
              "--plot", str(tmp_path / "r.png"), "-p", "threats=2x2;5x5"])
    assert e.value.code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert set(r["certified_accuracy"]) == {"mask-bn@2x2", "mask-bn@5x5", "cbn@2x2", "cbn@5x5"}
    assert all(r["certified_accuracy"][k] <= r["clean_accuracy_per_variant"][k] for k in r["certified_accuracy"])
    assert (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["mask-bn", "mask-ds"])
def test_torch_cpu_backend_matches_onnxruntime_cpu(bundles, models, variant):
    split = datasets.load(models["data"])
    ref = certinfer.load(bundles[variant], backend="onnxruntime-cpu")
    got = certinfer.load(bundles[variant], backend="torch-cpu")  # certinfer.load passes train.models.build
    x = ref.prepare(split.x[:24])
    a, b = ref.local_features(x), got.local_features(x)  # local logits, or every ablation's logits
    assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
    verdicts = got(split.x[:24])
    assert [v.label for v in ref(split.x[:24])] == [v.label for v in verdicts]
    assert not got.trusted and got.needs_exact  # torch-cpu: not in probe.exact_backends
    assert not any(v.certificate.certified for v in verdicts)
