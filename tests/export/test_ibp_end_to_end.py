"""IBP end to end on a tiny network trained here: certificate training, export (parity, rounding check), certified
frames attacked at every location with random, solid, copied and PGD patches (zero flips), torch engine, certify CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import certinfer
from certinfer.bench.soundness import ibp_soundness
from certinfer.export.ibp import export_ibp
from certinfer.train import data as datasets
from certinfer.train.ibp import TrainConfig, train
from certinfer.train.models.ibp import arch

INPUT_HW = (16, 16)
THREAT = "2x2"


def tiny_config(gtsrb4, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(dataset=f"folder:{gtsrb4}", input_hw=INPUT_HW, model=arch("small", INPUT_HW),
                                 patch=2, k=4, epochs=8, batch_size=32, ramp_start=0.5, ramp_epochs=4.0,
                                 lr_decay_every=2, eval_images=160, val_images=20, eval_every=100), **kw})


@pytest.fixture(scope="module")
def model(tmp_path_factory, gtsrb4):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("ibp")
    metrics = train(tiny_config(gtsrb4), run, device="cpu")
    return run / "model.safetensors", f"folder:{gtsrb4}/test", metrics


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ibp-bundle") / "b"
    export_ibp(model[0], out, threat=THREAT, eval_limit=160)
    return out


@pytest.mark.slow
def test_training_certifies_and_the_bundle_agrees_with_the_trainer(model, bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    runtime, trainer = m["provenance"]["metrics"], model[2]["test"]
    assert runtime["n"] == trainer["n"] == 160
    assert runtime["certified_accuracy"]["default"] >= 0.2, (runtime, trainer)  # certified frames for the attacks
    assert abs(runtime["certified_accuracy"]["default"] - trainer["certified"]) <= 1 / 160  # tolerance may drop one
    assert abs(runtime["clean_accuracy"] - trainer["clean"]) <= 1 / 160
    assert m["probe"]["exact_backends"] == ["onnxruntime-cpu", "torch-cpu"]
    assert {e["role"] for e in m["engines"]} == {"model", "bounds"}


@pytest.mark.slow
def test_certified_frames_survive_patch_attacks_at_every_location(model, bundle):
    report = ibp_soundness(bundle, model[0], model[1], images=4, threat="2x2,1x3", pgd_steps=10)
    locations = 15 * 15 + 16 * 14
    assert report["certified_frames_attacked"] == 4
    assert report["patched_frames_evaluated"] == 4 * 4 * locations
    assert report["total_flips"] == 0, report["flips"]


@pytest.mark.slow
def test_torch_cpu_engines_match_onnxruntime(model, bundle):
    x_raw = datasets.load(model[1]).x[:8]
    ref = certinfer.load(bundle, backend="onnxruntime-cpu")
    got = certinfer.load(bundle, backend="torch-cpu")
    assert (got.engine.name, got.engines["bounds"].name) == ("torch-cpu", "torch-cpu")
    x = ref.prepare(x_raw)
    (za, ma), (zb, mb) = ((f.logits, f.min_margins) for f in (ref.infer(x), got.infer(x)))
    assert np.abs(za - zb).max() <= 1e-4 * max(1.0, np.abs(za).max())
    assert np.abs(ma["2x2"] - mb["2x2"]).max() <= 1e-4 * max(1.0, np.abs(ma["2x2"]).max())
    assert [v.status for v in ref(x_raw)] == [v.status for v in got(x_raw)]


@pytest.mark.slow
def test_guided_and_all_patch_training_run(gtsrb4, tmp_path):
    for strategy, k in (("guided", 2), ("all", 1)):
        cfg = tiny_config(gtsrb4, strategy=strategy, k=k, epochs=1, limit=64, eval_images=4)
        metrics = train(cfg, tmp_path / strategy, device="cpu")
        assert metrics["history"][0]["loss"] == metrics["history"][0]["loss"]  # finite, not NaN
        assert (tmp_path / strategy / "model.safetensors").is_file()


@pytest.mark.slow
def test_certify_cli_reports_rects_and_shape_transfer(bundle, model, tmp_path, capsys):
    from certinfer.cli import main

    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        main(["certify", str(bundle), "--data", model[1], "--limit", "12", "--out", str(out),
              "--plot", str(tmp_path / "r.png")])
    assert e.value.code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    per = r["certified_accuracy_per_rect"]["default"]
    assert set(per) == {"2x2", "5x5", "1x4", "4x1", "3x3"} and r["threat"] == "2x2,5x5"
    assert r["certified_accuracy"]["default"] <= min(per["2x2"], per["5x5"]) <= r["clean_accuracy"]
    assert (tmp_path / "r.png").stat().st_size > 1000
