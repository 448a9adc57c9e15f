"""Randomized cropping end to end on a tiny crop classifier trained here: export, runtime vs torch on the same crops,
one engine call per batch, OS-entropy crops, patch attacks within the certificate's budget, the certify CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import certinfer
from certinfer.bench.soundness import cropping_soundness
from certinfer.export.cropping import export_cropping, load_network
from certinfer.runtime.defenses import cropping
from certinfer.train import data as datasets
from certinfer.train.cropping import TrainConfig, train

TINY = dict(widths=(8, 16, 16, 32), crop_hw=(8, 8))
INPUT_HW = (24, 24)  # 17 x 17 crop locations; a 2x2 patch overlaps at most 9 x 9 of them
THREAT = "2x2"
CROPS = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory, gtsrb4):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("crop")
    cfg = TrainConfig(dataset=f"folder:{gtsrb4}", model=dict(TINY), input_hw=INPUT_HW, epochs=10, batch_size=64,
                      lr=3e-3, warmup_epochs=0.5, eval_every=100, eval_crops=32, eval_threat=THREAT)
    train(cfg, run, device="cpu")
    return run / "model.safetensors", f"folder:{gtsrb4}/test"


@pytest.fixture(scope="module")
def bundles(model, tmp_path_factory):
    made = {}
    for mode in ("sample", "exhaustive"):
        made[mode] = tmp_path_factory.mktemp(mode) / "b"
        export_cropping(model[0], made[mode], threat=THREAT, crops=CROPS, mode=mode, eval_limit=40)
    return made


@pytest.mark.slow
def test_runtime_votes_match_torch_on_the_same_crops(model, bundles):
    split = datasets.load(model[1])
    cert = certinfer.load(bundles["sample"], backend="onnxruntime-cpu").seeded(7)
    verdicts = cert(split.x[:24])
    assert all(v.certificate.kind == "probabilistic" and 0.0 <= v.certificate.p <= 1.0 for v in verdicts)
    assert all((v.status == "certified") == (v.certificate.p >= 0.95) for v in verdicts)
    # the same draw, cut and classified in torch
    flat = cropping.draw_locations(np.random.default_rng(7), 24, CROPS, cert.locations, replace=True)
    net, _, _ = load_network(model[0])
    with torch.no_grad():
        z = net(torch.from_numpy(cropping.cut(cert.prepare(split.x[:24]), cert.crop_hw, flat))).numpy()
    votes = cropping.count_votes(z.argmax(1).reshape(24, CROPS), len(cert.classes))
    assert [v.label for v in verdicts] == votes.argmax(1).tolist()
    assert [v.scores for v in verdicts] == votes.astype(float).tolist()


@pytest.mark.slow
def test_every_crop_of_a_batch_goes_to_the_engine_in_one_call(bundles):
    for mode, per_frame in (("sample", CROPS), ("exhaustive", 17 * 17)):
        cert = certinfer.load(bundles[mode], backend="onnxruntime-cpu")
        calls = []
        run = cert.engine.run
        cert.engine.run = lambda b: calls.append(b.shape) or run(b)
        assert len(cert(np.zeros((3, 32, 32, 3), np.uint8))) == 3
        assert calls == [(3 * per_frame, 5, 8, 8)]


@pytest.mark.slow
def test_crops_come_from_os_entropy_unless_a_seed_is_fixed(bundles):
    a = certinfer.load(bundles["sample"], backend="onnxruntime-cpu")
    b = certinfer.load(bundles["sample"], backend="onnxruntime-cpu")
    assert not np.array_equal(a.draw(4), b.draw(4))
    assert np.array_equal(a.seeded(3).draw(4), b.seeded(3).draw(4))
    assert not np.array_equal(a.draw(4), b.draw(4))  # seeded copies leave the originals on OS entropy
    exhaustive = certinfer.load(bundles["exhaustive"], backend="onnxruntime-cpu")
    assert exhaustive.kind == "recovery" and np.array_equal(exhaustive.draw(2)[1], np.arange(17 * 17))
    assert a.kind == "probabilistic" and a.with_options(exhaustive=True).kind == "recovery"


@pytest.mark.slow
def test_patch_attacks_on_certified_frames_stay_within_the_probabilistic_budget(model, bundles):
    report = cropping_soundness(bundles["sample"], model[0], model[1], images=3, threat=THREAT, pgd_steps=3,
                                crop_seed=12345)  # the seed is the runtime's; the attacker never sees it
    n = report["patched_frames_evaluated"]
    assert report["certified_frames_attacked"] == 3 and n == 3 * 4 * 23 * 23
    rate, budget = report["total_flips"] / n, 1 - 0.95
    assert rate <= budget + 3 * math.sqrt(budget * (1 - budget) / n), report["flips"]


@pytest.mark.slow
def test_exhaustive_certificates_survive_every_patch(model, bundles):
    report = cropping_soundness(bundles["exhaustive"], model[0], model[1], images=1, threat=THREAT, pgd_steps=3)
    assert report["certified_frames_attacked"] == 1 and report["budget"] == 0.0
    assert report["total_flips"] == 0, report["flips"]


@pytest.mark.slow
def test_certify_cli_reports_every_variant(bundles, model, tmp_path, capsys):
    from certinfer.cli import main

    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        main(["certify", str(bundles["sample"]), "--data", model[1], "--limit", "24", "--out", str(out),
              "--plot", str(tmp_path / "r.png"), "-p", "shapes=2x2,1x4,4x1,rot45:2x2"])
    assert e.value.code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    names = {f"{p}{n}" for p in ("r", "nr") for n in (64, 128, 256)} | {"r128-p0.93", "r128-p0.97", "r128-p0.99"}
    assert names | {"r128@shapes", "exhaustive", "exhaustive@shapes"} <= set(r["certified_accuracy"])
    assert set(r["certified_accuracy_per_rect"]["r128@shapes"]) == {"2x2", "1x4", "4x1", "3x3"}
    acc = r["certified_accuracy"]
    assert all(acc[k] <= r["clean_accuracy_per_variant"][k] for k in acc)
    assert "nr512" not in acc  # 512 crops without replacement do not exist among 289 locations
    assert (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.slow
def test_torch_cpu_backend_matches_onnxruntime_cpu(model, bundles):
    split = datasets.load(model[1])
    for mode in ("sample", "exhaustive"):
        ref = certinfer.load(bundles[mode], backend="onnxruntime-cpu")
        got = certinfer.load(bundles[mode], backend="torch-cpu")  # certinfer.load passes train.models.build
        assert got.engine.name == "torch-cpu"
        x = ref.prepare(split.x[:16])
        flat_a, flat_b = ref.seeded(3).draw(16), got.seeded(3).draw(16)
        assert np.array_equal(flat_a, flat_b)
        crops = cropping.cut(x, ref.crop_hw, flat_a)  # the same crops on both backends
        a, b = ref.run_engine(crops), got.run_engine(crops)
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
        got_verdicts = got.seeded(3)(split.x[:16])
        assert [(v.label, v.scores) for v in ref.seeded(3)(split.x[:16])] == [(v.label, v.scores) for v in got_verdicts]
        # the export verified onnxruntime CPU batch-independent; torch counts its near-tie crops as changed
        assert ref.manifest["probe"]["exact_backends"] == ["onnxruntime-cpu"]
        assert ref.manifest["probe"]["batch"]["batch_invariant"] and ref.trusted and not got.trusted
        assert ref.infer(x).near is None and got.infer(x).near.shape == flat_a.shape
        assert (got.batch_atol(), ref.batch_atol()) == (cropping.TIE_TOLERANCE / 2, 0.0)
