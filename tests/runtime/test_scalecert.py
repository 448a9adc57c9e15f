"""ScaleCert: window family and candidate region properties, SIN winners (ties, occlusion), top-k invariance outside
R, runtime vs the plain reference, Algorithm 1's alert, patch attacks on certified frames, the certify CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import certinfer
from certinfer.bench import scalecert_reference as ref
from certinfer.bench.soundness import scalecert_soundness
from certinfer.export.scalecert import export_scalecert, load_network
from certinfer.runtime.defenses.scalecert import (Occlusions, candidate_region, detect_frame, family, meets_region,
                                                  window_side)
from certinfer.runtime.geometry import Geometry
from certinfer.train import data as datasets
from certinfer.train.models.scalecert import SINNetConfig, SINNet
from certinfer.train.scalecert import TrainConfig, train

TINY = dict(stem=8, widths=(12, 16), strides=(2, 2), blocks=(1, 1), top_k=0.1)
INPUT_HW = (16, 16)
THREAT = "2x2"


# --- windows and the candidate region (no model) -----------------------------------------------------------

def _random_geometry(rng, hw) -> Geometry:
    rf, stride = (int(rng.integers(1, 6)),) * 2, (int(rng.integers(1, 3)),) * 2
    pad = (int(rng.integers(0, rf[0])),) * 2
    out = tuple((h + 2 * pad[0] - rf[0]) // stride[0] + 1 for h in hw)
    return Geometry(rf=rf, stride=stride, padding=pad, input_hw=hw, output_hw=out)


def test_window_family_never_drops_coverage_over_random_regions():
    rng = np.random.default_rng(0)
    for _ in range(150):
        hw = (int(rng.integers(6, 40)), int(rng.integers(6, 40)))
        rect = (int(rng.integers(1, hw[0] + 1)), int(rng.integers(1, hw[1] + 1)))
        r, tau = int(rng.integers(1, 5)), float(rng.uniform(0.05, 1.0))
        fam = family(hw, rect, r, tau)
        boxes = fam.boxes()
        s = (window_side(rect[0], r, hw[0]), window_side(rect[1], r, hw[1]))
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] <= hw[0]).all()  # inside the frame: shifted, never cut
        assert (boxes[:, 2] >= 0).all() and (boxes[:, 3] <= hw[1]).all()
        assert (boxes[:, 1] - boxes[:, 0] >= s[0]).all() and (boxes[:, 3] - boxes[:, 2] >= s[1]).all()
        assert fam.containing.any(axis=1).all()  # every patch position lies inside some window
        assert [tuple(b) for b in boxes[:, [0, 1, 2, 3]]] == ref.windows(hw, rect, r, tau)
        g = _random_geometry(rng, hw)
        keep = rng.random((3, *g.output_hw)) < rng.uniform(0.0, 0.3)
        R = candidate_region(keep, g)
        for n in range(3):
            assert np.array_equal(R[n], ref.region(keep[n], g))
        sel = meets_region(keep, fam, g)
        assert np.array_equal(sel, np.array([[R[n, t:b, l:rr].any() for t, b, l, rr in boxes] for n in range(3)]))
        # every unmerged window meeting R lies inside a selected merged window
        for n in range(3):
            for t in range(hw[0] - s[0] + 1):
                for left in range(hw[1] - s[1] + 1):
                    if R[n, t:t + s[0], left:left + s[1]].any():
                        inside = ((boxes[:, 0] <= t) & (t + s[0] <= boxes[:, 1]) & (boxes[:, 2] <= left)
                                  & (left + s[1] <= boxes[:, 3]))
                        assert (inside & sel[n]).any()


def test_algorithm1_alerts_with_the_location_only_when_every_covering_window_agrees():
    fam = family(INPUT_HW, (2, 2), 3, 0.3)
    boxes = fam.boxes()
    logits0 = np.eye(4)[1] * 5.0
    covering = fam.containing[5 * 15 + 7]  # the windows containing a 2x2 patch at row 5, column 7
    z = np.tile(np.eye(4)[1] * 5.0, (fam.size, 1))
    z[covering] = np.eye(4)[2] * 5.0
    selected = np.ones(fam.size, bool)
    status, reason = detect_frame(logits0, {"2x2": Occlusions(selected, z)}, {"2x2": fam})
    assert status == "alert" and "patch detected" in reason
    top, left = (int(v) for v in reason.split("row ")[1].split(" (")[0].split(", column "))
    inside = fam.containing[top * 15 + left]
    assert inside.any() and (z[inside].argmax(1) == 2).all()
    assert boxes[inside][:, 0].max() <= top and left + 2 <= boxes[inside][:, 3].min()
    selected[np.flatnonzero(covering)[0]] = False  # one covering window not evaluated: no line-11 alert
    status, _ = detect_frame(logits0, {"2x2": Occlusions(selected, z)}, {"2x2": fam})
    assert status == ""  # majority of the evaluated windows keeps the label: benign with noise
    status, _ = detect_frame(logits0, {"2x2": Occlusions(selected, np.tile(np.eye(4)[3], (fam.size, 1)))},
                             {"2x2": fam})
    assert status == "alert"


class _WinnerEngine:
    """A stand-in ScaleCert engine: class 0, one winner at output (0, 0); occluding it makes class 1 win."""

    name, precision, max_batch = "onnxruntime-cpu", "fp32", 1 << 20

    def run(self, batch: np.ndarray):
        occluded = batch[:, 3, :3, :3].any(axis=(1, 2))  # the winner's receptive field (rf 3, padding 1)
        logits = np.zeros((len(batch), 3), np.float32)
        logits[np.arange(len(batch)), occluded.astype(int)] = 2.0
        keep = np.zeros((len(batch), *INPUT_HW), np.float32)
        keep[:, 0, 0] = 1.0
        return logits, keep


def test_options_choose_the_windows_and_decide_reads_them_from_the_features():
    from types import SimpleNamespace

    from certinfer.runtime.defenses.scalecert import ScaleCertCertifier, ScaleCertOptions
    from certinfer.threat import parse

    g = Geometry(rf=(3, 3), stride=(1, 1), padding=(1, 1), input_hw=INPUT_HW, output_hw=INPUT_HW)
    manifest = {"defense": {"kind": "scalecert", "params": {"r": 3, "tau": 0.3}}, "geometry": g.to_dict(),
                "input": {"hw": list(INPUT_HW), "mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["a", "b", "c"]},
                "probe": {"exact_backends": ["onnxruntime-cpu"]}}
    cert = ScaleCertCertifier(SimpleNamespace(manifest=manifest), {"model": _WinnerEngine()},
                              parse(THREAT, input_hw=INPUT_HW))
    assert cert.kind == "detection" and cert.needs_exact and cert.trusted
    features = cert.infer(cert.prepare(np.zeros((2, *INPUT_HW, 3), np.uint8)))
    assert features.families[THREAT] is family(INPUT_HW, (2, 2), 3, 0.3)
    selected, logits = features.occlusions[THREAT]
    assert np.array_equal(selected[0], meets_region(features.keep[:1], features.families[THREAT], g)[0])
    assert (logits[selected].argmax(axis=1) == 1).all()  # every evaluated window occludes the winner
    (v, _) = cert.certify(features)
    assert v.status == "alert" and v.label == -1 and not v.certificate.certified
    wide = cert.with_options(tau=0.9)
    assert wide.infer_key() != cert.infer_key() and wide.families()[THREAT] is family(INPUT_HW, (2, 2), 3, 0.9)
    for bad in (dict(r=0), dict(tau=0.0), dict(tau=1.5), dict(r=2.5)):
        with pytest.raises(ValueError, match="scalecert"):
            ScaleCertOptions(**bad)


# --- the SIN layer -------------------------------------------------------------------------------------------

def test_winners_exclude_occluded_positions_even_when_all_scores_tie():
    net = SINNet(SINNetConfig(num_classes=3, input_hw=(8, 8), stem=4, widths=(4,), strides=(2,), blocks=(1,),
                              top_k=0.9)).eval()
    with torch.no_grad():
        net.superficial[0].weight.zero_()  # every score is 0: the k-th largest ties with everything
    x = torch.zeros(2, 4, 8, 8)
    x[1, 3, 2:7, 1:6] = 1  # occlusion: 49 affected positions, so fewer than k = 58 remain
    _, keep = net(x)
    _, affected = net.features(x)
    assert keep[0].all()  # ties all kept
    assert not (keep[1].bool() & affected[1]).any() and keep[1].bool().equal(~affected[1])


def test_affected_positions_are_the_geometry_of_the_superficial_layer():
    cfg = SINNetConfig(num_classes=3, input_hw=(12, 12), stem=4, kernel=5, widths=(4,), strides=(2,), blocks=(1,))
    net, g = SINNet(cfg).eval(), Geometry.from_dict(cfg.geometry())
    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(1, 6, 2))
        t, left = int(rng.integers(0, 13 - h)), int(rng.integers(0, 13 - w))
        x = torch.zeros(1, 4, 12, 12)
        x[0, 3, t:t + h, left:left + w] = 1
        (r0, r1), (c0, c1) = g.affected((h, w), (t, left))
        want = torch.zeros(12, 12, dtype=torch.bool)
        want[r0:r1, c0:c1] = True
        assert net.features(x)[1][0].equal(want)


# --- a tiny trained model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory, gtsrb4):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("scalecert")
    cfg = TrainConfig(dataset=f"folder:{gtsrb4}", model=dict(TINY), input_hw=INPUT_HW, epochs=8, dense_epochs=2,
                      batch_size=64, lr=4e-3, warmup_epochs=0.5, crop_pad=1, occlusion_threat=THREAT, occlude=0.7,
                      eval_every=100, eval_images=160)
    train(cfg, run, device="cpu")
    return run / "model.safetensors", f"folder:{gtsrb4}/test"


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    export_scalecert(model[0], out, threat=THREAT, probe_trials=32, eval_limit=40)
    return out


def _engine(cert):
    return lambda b: cert.engine.run(np.ascontiguousarray(b, np.float32))


def test_occluding_a_window_outside_r_leaves_the_pruned_map_and_the_logits_bit_identical(model, bundle):
    cert = certinfer.load(bundle, backend="onnxruntime-cpu")
    net, _, _ = load_network(model[0])
    x = cert.prepare(datasets.load(model[1]).x[:12])
    fam = cert.families()[THREAT]
    logits0, keep = cert.engine.run(cert.engine_input(x))
    outside = ~meets_region(keep, fam, cert.geometry)
    n, w = np.nonzero(outside)
    assert len(n) > 20
    rows = cert.engine_input(x[n], fam.masks[w])
    with torch.no_grad():
        base = net.prune(*net.features(torch.from_numpy(cert.engine_input(x))))[0]
        occluded = net.prune(*net.features(torch.from_numpy(rows)))[0]
    assert torch.equal(occluded, base[n])
    z, _ = cert.engine.run(rows)
    assert np.array_equal(z.view(np.uint32), logits0[n].view(np.uint32))


def test_runtime_matches_the_plain_reference_and_makes_one_engine_call_per_pass(model, bundle):
    cert = certinfer.load(bundle, backend="onnxruntime-cpu")
    frames = datasets.load(model[1]).x[::10][:16]
    calls = []
    run = cert.engine.run
    cert.engine.run = lambda b: calls.append(b.shape) or run(b)
    verdicts = cert(frames)
    selected = sum(int(s.sum()) for s, _ in cert.infer(cert.prepare(frames)).occlusions.values())
    assert calls[:2] == [(16, 4, *INPUT_HW), (selected, 4, *INPUT_HW)]
    cert.engine.run = run
    x = cert.prepare(frames)
    for i, v in enumerate(verdicts):
        assert v.certificate.kind == "detection"
        assert v.certificate.certified == ref.certify_reference(_engine(cert), x[i], cert.geometry, (2, 2), 3, 0.3)
        expect = ref.detect_reference(_engine(cert), x[i], cert.geometry, (2, 2), 3, 0.3)
        assert (v.status == "alert") == (expect == "alert"), v.reason
    assert any(v.status == "certified" for v in verdicts)


def test_patch_attacks_on_certified_frames_give_the_label_or_an_alert(model, bundle):
    report = scalecert_soundness(bundle, model[0], model[1], images=2, threat=THREAT, pgd_steps=4)
    assert report["certified_frames_attacked"] == 2 and report["patched_frames_evaluated"] == 2 * 4 * 15 * 15
    assert report["total_flips"] == 0, report["flips"]


def test_backends_outside_the_probe_list_never_certify(model, bundle):
    got = certinfer.load(bundle, backend="torch-cpu")
    verdicts = got(datasets.load(model[1]).x[:8])
    assert not any(v.certificate.certified for v in verdicts)
    assert all("torch-cpu (model) is not verified" in v.reason or v.status == "alert" for v in verdicts)


def test_certify_cli_reports_both_threats_with_windows_and_a_plot(model, bundle, tmp_path, capsys):
    from certinfer.cli import main

    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        main(["certify", str(bundle), "--data", model[1], "--limit", "12", "--out", str(out),
              "--plot", str(tmp_path / "r.png"), "--backend", "onnxruntime-cpu"])
    assert e.value.code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert set(r["certified_accuracy"]) == {"2.4%", "0.4%"}
    assert all(r["certified_accuracy"][t] <= r["clean_accuracy_per_variant"][t] for t in ("2.4%", "0.4%"))
    assert all(r["scalecert"][t]["windows_per_image"] > 0 for t in ("2.4%", "0.4%"))
    assert (tmp_path / "r.png").stat().st_size > 1000
    shards = []
    for i in range(2):
        shards.append(tmp_path / f"s{i}.json")
        with pytest.raises(SystemExit) as e:
            main(["certify", str(bundle), "--data", model[1], "--limit", "5", "--shard", f"{i}/2",
                  "--out", str(shards[-1]), "--backend", "onnxruntime-cpu"])
        assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["certify", "--merge", str(shards[0]), "--merge", str(shards[1]), "--out", str(tmp_path / "m.json"),
              "--plot", str(tmp_path / "m.png")])
    assert e.value.code == 0
    parts, merged = [json.loads(f.read_text()) for f in shards], json.loads((tmp_path / "m.json").read_text())
    for t in ("2.4%", "0.4%"):  # the windows per image and the alerts survive a merge of shards
        want = sum(p["scalecert"][t]["windows_per_image"] * p["n"] for p in parts) / merged["n"]
        assert merged["scalecert"][t]["windows_per_image"] == pytest.approx(want)
        assert merged["scalecert"][t]["alerts"] == sum(p["scalecert"][t]["alerts"] for p in parts)
    assert merged["windows"] == parts[0]["windows"] and (tmp_path / "m.png").stat().st_size > 1000


def test_inspect_probe_checks_the_superficial_layer_and_catches_an_edited_geometry(bundle, tmp_path, capsys):
    import shutil

    from certinfer.cli import main
    from certinfer.export.bundle_writer import reseal

    with pytest.raises(SystemExit) as e:
        main(["inspect", "--probe", str(bundle)])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    assert "probe       onnxruntime-cpu: passed" in out and "preactivation (ReduceSum input)" in out
    edited = tmp_path / "edited"
    shutil.copytree(bundle, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    g = manifest["geometry"]
    g["rf"] = [v - 2 for v in g["rf"]]  # a smaller receptive field than the layer's: R(x) would miss pixels
    g["padding"] = [max(v - 1, 0) for v in g["padding"]]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    reseal(edited)
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--probe", str(edited)])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "probe       onnxruntime-cpu: FAILED" in out


@pytest.mark.slow
def test_inspect_probe_checks_batch_independence_at_the_engines_largest_batch(bundle):
    from certinfer.export.probe import probe_bundle

    report = probe_bundle(bundle, trials=8, backends=["onnxruntime-cpu"])["onnxruntime-cpu"]
    assert report["status"] == "passed", report
    # pass 1 and pass 2 inputs (frames and their occluded copies), run as the runtime may batch them and at the
    # sizes it called (4 frames, then their occluded copies)
    assert report["batch"]["model"] == {"rows": 1024, "batch_sizes": [1, 4, 7, 64, 194, 1024], "rows_alone": 8,
                                        "batch_invariant": True}
