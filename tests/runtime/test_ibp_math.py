"""IBP math on random networks: the exported bounds graph vs torch IBP, the runtime vs the plain float64 reference
(bench/ibp_reference.py), bounds containing sampled patch contents, and the certifier's refusals."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import certinfer  # noqa: E402
from certinfer.bench.ibp_reference import (certificate_reference, layers_of, margin_bounds_reference,  # noqa: E402
                                           min_margins_reference)
from certinfer.export.bundle_writer import write_bundle  # noqa: E402
from certinfer.export.onnx_export import export_onnx  # noqa: E402
from certinfer.runtime.defenses import ibp  # noqa: E402
from certinfer.train.ibp import PatchBoxes, TrainConfig, eps_at, lr_at  # noqa: E402
from certinfer.train.models.ibp import IBPBounds, IBPNet, margin_lower  # noqa: E402

HW = (10, 10)
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
ARCHS = {"conv": {"convs": [[4, 3, 1, 1], [6, 4, 2, 1]], "fcs": [16], "input_hw": list(HW)},
         "mlp": {"convs": [], "fcs": [12, 12], "input_hw": list(HW)}}
CLASSES = 5


def random_net(arch: str, seed: int) -> IBPBounds:
    torch.manual_seed(seed)
    net = IBPBounds(CLASSES, ARCHS[arch]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)  # larger weights than the default init: wider bounds, more ReLUs that straddle zero
    return net


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *HW, 3), dtype=np.uint8)


def logits_net(net: IBPBounds, arch: str) -> IBPNet:
    out = IBPNet(CLASSES, ARCHS[arch]).eval()
    out.load_state_dict(net.state_dict())
    return out


def bundle_for(net: IBPBounds, arch: str, path, threat: str = "2x2", **params):
    """A bundle with the network's model and bounds graphs (onnxruntime only), verified on onnxruntime-cpu."""
    x = torch.zeros(2, 3, *HW)
    logits = logits_net(net, arch)
    files = {"model.onnx": export_onnx(logits, (x,), ["input"], ["logits"]),
             "bounds.onnx": export_onnx(net, (torch.cat([x, x], 1),), ["input"], ["margins"])}
    params = {k: v for k, v in {"tolerance": 1e-3, "verified_backends": ["onnxruntime-cpu"], **params}.items()
              if v is not None}  # None: leave the key out
    manifest = {"defense": {"kind": "ibp", "params": params},
                "input": {"hw": list(HW), "channels": 3, "mean": MEAN, "std": STD,
                          "classes": [f"c{i}" for i in range(CLASSES)]},
                "threat": threat, "provenance": {"commit": "test"},
                "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "role": "model",
                             "batch": [1, 256]},
                            {"file": "bounds.onnx", "format": "onnx", "precision": "fp32", "role": "bounds",
                             "batch": [1, 256]}]}
    return write_bundle(path, manifest, files)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_exported_bounds_graph_equals_torch_ibp(arch, tmp_path):
    net = random_net(arch, 1)
    cert = certinfer.load(bundle_for(net, arch, tmp_path / "b"), backend="onnxruntime-cpu")
    x = cert.prepare(frames(6, 2))
    lo, hi = ibp.patch_interval(MEAN, STD)
    corners = np.array([[0, 0], [3, 4], [8, 8], [5, 1], [2, 7], [8, 0]])
    boxes = ibp.interval_inputs(x, (2, 2), corners, lo, hi)
    got = cert.engines["bounds"].run(boxes)
    with torch.no_grad():
        want = net(torch.from_numpy(boxes)).numpy()
        rows = margin_lower(net, torch.from_numpy(boxes[:, :3]), torch.from_numpy(boxes[:, 3:]),
                            torch.arange(6) % CLASSES).numpy()  # the training path: one row per sample
    scale = max(1.0, np.abs(want).max())
    assert got.shape == (6, CLASSES, CLASSES)
    assert np.abs(got - want).max() <= 1e-5 * scale
    assert np.abs(rows - want[np.arange(6), np.arange(6) % CLASSES]).max() <= 1e-5 * scale
    assert np.all(np.diagonal(got, axis1=1, axis2=2) == 0)


def test_runtime_min_margins_and_certificates_equal_the_plain_reference(tmp_path):
    net = random_net("conv", 3)
    path = bundle_for(net, "conv", tmp_path / "b", threat="2x2,3x1", chunk=37)
    cert = certinfer.load(path, backend="onnxruntime-cpu")
    x = cert.prepare(frames(2, 4))
    features = cert.infer(x)
    decisions = cert.certify(features)
    layers, (lo, hi) = layers_of(net), ibp.patch_interval(MEAN, STD)
    for i in range(2):
        for rect in ((2, 2), (3, 1)):
            ref = min_margins_reference(layers, x[i], rect, lo, hi)
            key = f"{rect[0]}x{rect[1]}"
            assert np.abs(features.min_margins[key][i] - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
            certified, margin = certificate_reference(ref, decisions[i].label, 1e-3)
            got = decisions[i].certificate.per_rect[key]
            assert got.certified == certified and got.margin == pytest.approx(margin, abs=1e-4)


def test_tolerance_decides_near_zero_margins():
    m = np.zeros((1, 3, 3), np.float32)
    m[0, 0] = [0.0, 5e-4, 2e-3]
    assert not ibp.certify({"2x2": m}, np.array([0]), "2x2", 1e-3)[0].certified  # 5e-4 is within the rounding slack
    m[0, 0, 1] = 1.5e-3
    c = ibp.certify({"2x2": m}, np.array([0]), "2x2", 1e-3)[0]
    assert c.certified and c.per_rect["2x2"].margin == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="tolerance"):
        ibp.certify({"2x2": m}, np.array([0]), "2x2", 0.0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_bounds_contain_1000_random_patch_contents_at_each_tested_location(arch, tmp_path):
    net = random_net(arch, 5)
    cert = certinfer.load(bundle_for(net, arch, tmp_path / "b"), backend="onnxruntime-cpu")
    rng = np.random.default_rng(6)
    raw = frames(2, 7)
    for f in range(2):
        for rect, (t, l) in (((2, 2), (0, 0)), ((2, 2), (4, 6)), ((3, 1), (7, 9))):
            bound = cert.engines["bounds"].run(ibp.interval_inputs(cert.prepare(raw[f:f + 1]), rect, np.array([[t, l]]),
                                                        cert.patch_lo, cert.patch_hi))[0]
            patched = np.repeat(raw[f:f + 1], 1000, axis=0)
            contents = rng.integers(0, 256, size=(1000, *rect, 3))
            contents[:100] = rng.choice([0, 255], size=(100, *rect, 3))  # corners of the box too
            patched[:, t:t + rect[0], l:l + rect[1]] = contents
            z = cert.logits(cert.prepare(patched)).astype(np.float64)
            diff = z[:, :, None] - z[:, None, :]
            assert np.all(diff >= bound[None] - 1e-4), float((bound[None] - diff).max())


def test_reference_bounds_match_the_center_radius_form_and_shrink_to_a_point():
    net = random_net("conv", 8)
    x = np.random.default_rng(9).normal(size=(1, 3, *HW)).astype(np.float32)
    with torch.no_grad():
        point = net(torch.from_numpy(np.concatenate([x, x], 1))).numpy()[0]
        logits = logits_net(net, "conv")(torch.from_numpy(x)).numpy()[0]
    assert np.allclose(margin_bounds_reference(layers_of(net), x[0], x[0]), logits[:, None] - logits[None], atol=1e-4)
    assert np.allclose(point, logits[:, None] - logits[None], atol=1e-4)


def test_fp16_bounds_engines_are_refused(tmp_path):
    path = bundle_for(random_net("mlp", 1), "mlp", tmp_path / "b")
    import json

    from certinfer.export.bundle_writer import reseal

    m = json.loads((path / "manifest.json").read_text())
    m["engines"][1]["precision"] = "fp16"
    (path / "manifest.json").write_text(json.dumps(m))
    reseal(path)
    with pytest.raises(ValueError, match="bounds engines must be fp32"):
        certinfer.load(path, backend="onnxruntime-cpu")


def test_a_bounds_backend_not_verified_at_export_gives_no_certificate(tmp_path):
    net = random_net("mlp", 2)
    with torch.no_grad():
        net.layers[-1].weight.zero_()
        net.layers[-1].bias.copy_(torch.tensor([5.0, 0, 0, 0, 0]))  # class 0 by 5 logits everywhere: certified
    path = bundle_for(net, "mlp", tmp_path / "b")
    assert certinfer.load(path, backend="onnxruntime-cpu")(frames(1, 0))[0].status == "certified"
    unverified = certinfer.load(bundle_for(net, "mlp", tmp_path / "c", verified_backends=["tensorrt"]),
                                backend="onnxruntime-cpu")
    v = unverified(frames(1, 0))[0]
    assert v.status == "uncertified" and "not verified" in v.reason and v.label == 0
    assert v.certificate.per_rect["2x2"].margin <= 0
    unrecorded = certinfer.load(bundle_for(net, "mlp", tmp_path / "d", verified_backends=None),
                                backend="onnxruntime-cpu")  # no record of any verification: nothing is trusted
    v = unrecorded(frames(1, 0))[0]
    assert v.status == "uncertified" and "not verified" in v.reason and v.label == 0


def test_tolerance_variants_share_one_inference(tmp_path):
    cert = certinfer.load(bundle_for(random_net("conv", 4), "conv", tmp_path / "b"), backend="onnxruntime-cpu")
    loose = cert.with_options(tolerance=1e-1)
    assert loose.infer_key() == cert.infer_key() and cert.options.tolerance == 1e-3
    features = cert.infer(cert.prepare(frames(4, 3)))
    for a, b in zip(cert.certify(features), loose.certify(features)):
        assert a.label == b.label
        assert b.certificate.per_rect["2x2"].margin == pytest.approx(a.certificate.per_rect["2x2"].margin - 0.099)
    with pytest.raises(ValueError, match="tolerance must be positive"):
        cert.with_options(tolerance=0.0)


def test_every_location_of_every_rect_reaches_the_bounds_engine_in_chunks(tmp_path):
    cert = certinfer.load(bundle_for(random_net("conv", 1), "conv", tmp_path / "b", threat="2x2,1x3", chunk=100),
                          backend="onnxruntime-cpu")
    calls = []
    bounds = cert.engines["bounds"]
    run = bounds.run
    bounds.run = lambda b: calls.append(len(b)) or run(b)
    cert(frames(3, 1))
    assert sum(calls) == 3 * (81 + 80) and max(calls) == 100


def test_patch_locations_and_training_boxes_agree_with_the_runtime_boxes():
    corners = ibp.patch_locations(HW, (2, 3))
    assert len(corners) == 9 * 8 and tuple(corners[9]) == (1, 1)
    lo, hi = ibp.patch_interval(MEAN, STD)
    x = np.random.default_rng(0).normal(size=(81, 3, *HW)).astype(np.float32)
    boxes = ibp.interval_inputs(x[:len(corners)], (2, 3), corners, lo, hi)
    train_boxes = PatchBoxes(HW, 2, MEAN, STD, "cpu")
    square = ibp.patch_locations(HW, (2, 2))
    tl, th = train_boxes.boxes(torch.from_numpy(x), torch.arange(81)[:, None], 1.0)
    want = ibp.interval_inputs(x, (2, 2), square, lo, hi)
    assert np.allclose(np.concatenate([tl.numpy(), th.numpy()], 1), want)
    t, l = corners[20]
    inside = np.zeros(HW, bool)
    inside[t:t + 2, l:l + 3] = True
    assert np.array_equal(boxes[20, :3][:, ~inside], x[20][:, ~inside])
    assert np.array_equal(boxes[20, 3:][:, ~inside], x[20][:, ~inside])
    assert np.all(boxes[20, :3][:, inside] == lo[:, None]) and np.all(boxes[20, 3:][:, inside] == hi[:, None])


def test_eps_ramp_and_lr_schedule():
    cfg = TrainConfig(ramp_start=1.0, ramp_epochs=4.0, lr=1e-3, lr_decay_every=2, epochs=10)
    assert [eps_at(cfg, e) for e in (0, 1, 2, 5, 9)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    assert [lr_at(cfg, e) for e in (0, 4, 5, 6, 7, 8)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4]
