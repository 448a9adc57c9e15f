"""``certinfer bench soundness`` on double-masking bundles (pixel and feature space) exported from a checkpoint of
a few seconds' training on four GTSRB classes: the PGD surrogate splits the first round, and no patch at any
location flips the inference label of a certified frame."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from certinfer.bench.attacks import locations, paste, pgd_contents  # noqa: E402
from certinfer.bench.bundles import load_certifier  # noqa: E402
from certinfer.bench.soundness import ENGINE, doublemask_soundness, doublemask_surrogate  # noqa: E402
from certinfer.cli import main  # noqa: E402
from certinfer.export.doublemask import export_checkpoint, load_classifier  # noqa: E402
from certinfer.train import data as datasets  # noqa: E402
from certinfer.train.doublemask import config_for, train  # noqa: E402

TINY = {"units": ["c3:8:1", "c3:16:2", "r1:16", "r3:16:2"], "dropout": 0.0}
THREAT, RECT, SPLIT = "3x3", (3, 3), 2
SPACES = ("pixel", "feature")


@pytest.fixture(scope="module")
def trained(gtsrb4, tmp_path_factory) -> dict:
    """A 16x16 classifier trained for six epochs under 3x3 masks at stride 4, and its two bundles."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dm-soundness")
    cfg = dataclasses.replace(config_for("gtsrb-cpu"), dataset=f"folder:{gtsrb4}", input_hw=(16, 16), model=TINY,
                              epochs=6, batch_size=32, lr=5e-3, threat=THREAT, stride=4, worst_of=1,
                              feature_splits=(SPLIT,), feature_prob=0.5, background=False)
    train(cfg, out, monitor_every=6)
    checkpoint = out / "model.safetensors"
    for space in SPACES:
        export_checkpoint(checkpoint, out / space, space=space, split=SPLIT if space == "feature" else None,
                          limit=40, probe_trials=16)
    return {"checkpoint": checkpoint, "data": f"folder:{gtsrb4 / 'test'}", **{s: out / s for s in SPACES}}


@pytest.mark.slow
@pytest.mark.parametrize("space", SPACES)
def test_pgd_surrogate_splits_the_first_round_without_flipping_the_label(trained, space):
    """The attack is not vacuous: PGD through the checkpoint's network makes the one-mask predictions of a
    certified frame disagree at most patch locations; the inference label stays."""
    cert = load_certifier(trained[space], ENGINE, THREAT)
    net, _ = load_classifier(trained["checkpoint"])
    frames = datasets.load(trained["data"]).x
    x, verdicts = cert.prepare(frames), cert(frames)
    i = next(i for i, v in enumerate(verdicts) if v.status == "certified")
    label, locs = verdicts[i].label, locations(cert.input_hw, RECT)
    objective = doublemask_surrogate(cert, net)(label, RECT, locs)
    lo, hi = x.min(axis=(0, 2, 3)), x.max(axis=(0, 2, 3))
    features = cert.infer(paste(x[i], RECT, locs, pgd_contents(objective, x[i], RECT, locs, lo, hi, steps=5)))
    first = features.one.argmax(axis=-1)
    assert (first != first[:, :1]).any(axis=1).mean() > 0.5
    assert all(d.label == label for d in cert.decide(features, cert.options))


@pytest.mark.slow
def test_soundness_counts_no_flips_on_either_space(trained, tmp_path):
    report = doublemask_soundness(trained["feature"], trained["checkpoint"], trained["data"], images=2,
                                  threat=THREAT, pgd_steps=3)
    out = tmp_path / "soundness.json"
    with pytest.raises(SystemExit) as e:  # the pixel bundle through the CLI: exit 0 when nothing flips
        main(["bench", "soundness", "--checkpoint", str(trained["checkpoint"]), "--bundle", str(trained["pixel"]),
              "--data", trained["data"], "--images", "2", "--threat", THREAT, "--pgd-steps", "3", "--out", str(out)])
    assert e.value.code == 0
    locs = len(locations((16, 16), RECT))
    for r, space in ((report, "feature"), (json.loads(out.read_text()), "pixel")):
        assert r["defense"] == "doublemask" and r["params"]["space"] == space and r["backend"] == ENGINE
        assert r["certified_frames_attacked"] == 2 and r["patched_frames_evaluated"] == 2 * 4 * locs
        assert r["flips"] == {"random": 0, "solid": 0, "copied": 0, "pgd": 0} and r["total_flips"] == 0, r
    assert np.isfinite(report["seconds"])
