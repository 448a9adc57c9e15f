"""Double masking on real ONNX bundles (pixel and feature space): loading, the plain reference, the front part's
locality probe, the speed benchmark, and the recovery guarantee under attack on a small trained model."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from certinfer.bench.doublemask_reference import reference_decisions  # noqa: E402
from certinfer.bench.doublemask_speed import levers, plot, speed  # noqa: E402
from certinfer.bench.doublemask_tradeoff import frame_macs, merge, onnx_macs  # noqa: E402
from certinfer.bench.doublemask_tradeoff import plot as plot_tradeoff  # noqa: E402
from certinfer.export.bundle_writer import write_bundle  # noqa: E402
from certinfer.export.probe import ProbeError, probe  # noqa: E402
from certinfer.runtime.defenses import doublemask as dm  # noqa: E402
from certinfer.runtime.geometry import Geometry  # noqa: E402
from certinfer.runtime.loader import load  # noqa: E402

HW = (16, 16)
THREAT, STRIDE = "3x3", 3
CLASSES = ["speed-30", "priority", "yield", "keep-right"]
FRONT = {"rf": [3, 3], "stride": [1, 1], "padding": [1, 1], "input_hw": list(HW), "output_hw": list(HW)}
BACKEND = "onnxruntime-cpu"
WIDTH = 8  # feature channels after the front part
FRAMES = 2  # certified test frames attacked per space


def _nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A front part (one 3x3 convolution: receptive field 3) and the rest of a small CNN."""
    torch.manual_seed(seed)
    front = nn.Sequential(nn.Conv2d(3, WIDTH, 3, padding=1), nn.ReLU())
    back = nn.Sequential(nn.Conv2d(WIDTH, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, len(CLASSES)))
    return front.eval(), back.eval()


def _onnx(module: nn.Module, channels: int, path: Path) -> Path:
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but fast for a test model
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, channels, *HW),), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    return path


def _manifest(space: str, mean, std, engines: list[dict], **extra) -> dict:
    return {"defense": {"kind": "doublemask", "params": {"stride": STRIDE, "mask_value": 0.0, "space": space}},
            "input": {"hw": list(HW), "channels": 3, "mean": list(mean), "std": list(std), "classes": CLASSES,
                      "resize": "bilinear"},
            "threat": THREAT, "engines": engines, "provenance": {"dataset": "test", "commit": "test"}, **extra}


def _bundles(folder: Path, front: nn.Module, back: nn.Module, mean=(0.5,) * 3, std=(0.25,) * 3,
             geometry: dict = FRONT) -> tuple[Path, Path]:
    """The same network as a pixel-space bundle (one graph) and as a feature-space bundle (front and back)."""
    folder.mkdir(parents=True, exist_ok=True)
    entry = {"format": "onnx", "precision": "fp32", "batch": [1, 4096]}
    whole = _onnx(nn.Sequential(front, back), 3, folder / "model.onnx")
    pixel = write_bundle(folder / "pixel", _manifest("pixel", mean, std, [{"file": "model.onnx", **entry}],
                                                     probe={"exact_backends": [BACKEND]}), {"model.onnx": whole})
    files = {"front.onnx": _onnx(front, 3, folder / "front.onnx"),
             "back.onnx": _onnx(back, WIDTH, folder / "back.onnx")}
    engines = [{"file": f"{role}.onnx", "role": role, **entry} for role in ("front", "back")]
    feature = write_bundle(folder / "feature", _manifest("feature", mean, std, engines, geometry=geometry,
                                                         probe={"exact_backends": [BACKEND]}), files)
    return pixel, feature


def _random_frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *HW, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> tuple[Path, Path]:
    return _bundles(tmp_path_factory.mktemp("doublemask"), *_nets())


def test_both_spaces_load_and_equal_the_per_copy_reference(untrained):
    for path, roles in zip(untrained, (("model",), ("front", "back"))):
        certifier = load(path, backend=BACKEND)
        assert certifier.roles == roles and certifier.trusted and certifier.needs_exact == (roles != ("model",))
        frames = _random_frames(4, seed=1)
        verdicts = certifier(frames)
        for v, (label, _, cert) in zip(verdicts, reference_decisions(certifier, frames), strict=True):
            assert v.label == label and v.certificate.certified == cert.certified
            assert v.certificate.per_rect["3x3"].margin == pytest.approx(cert.per_rect["3x3"].margin, abs=1e-4)


@pytest.mark.parametrize("space", ["pixel", "feature"])
def test_an_unverified_backend_withdraws_feature_certificates_and_raises_the_pixel_bar(tmp_path, space):
    """A masked copy may round differently in another batch on a backend the export's probe did not verify. Feature
    space also needs the front part's locality bit for bit: withdrawn, with the reason. Pixel space: certified
    where every gap clears the tolerance."""
    bundle = dict(zip(("pixel", "feature"), _bundles(tmp_path, *_nets())))[space]
    verified = load(bundle, backend=BACKEND)
    files = [e["file"] for e in verified.manifest["engines"]]
    unverified = write_bundle(tmp_path / "unverified", {**verified.manifest, "probe": {"exact_backends": []}},
                              {f: bundle / f for f in files})
    certifier = load(unverified, backend=BACKEND)
    assert not certifier.trusted
    frames = _random_frames(6, seed=2)
    strict, verdicts = verified(frames), certifier(frames)
    assert any(v.certificate.certified for v in strict)
    if space == "feature":
        assert not any(v.certificate.certified for v in verdicts) and all("not verified" in v.reason for v in verdicts)
    else:
        assert [v.certificate.certified for v in verdicts] == [
            v.certificate.certified and v.certificate.per_rect["3x3"].margin > certifier.tolerance for v in strict]
        assert not any(v.reason for v in verdicts)


def test_probe_catches_a_front_part_whose_receptive_field_exceeds_the_manifest(tmp_path):
    front, back = _nets()
    claims_1x1 = {**FRONT, "rf": [1, 1], "padding": [0, 0]}
    _, honest = _bundles(tmp_path / "honest", front, back)
    _, lying = _bundles(tmp_path / "lying", front, back, geometry=claims_1x1)
    images = np.random.default_rng(3).normal(size=(4, 3, *HW)).astype(np.float32)
    ok = load(honest, backend=BACKEND)
    report = probe(ok.local_features, images, ok.geometry, [(3, 3), (1, 1)], trials=16)
    assert report["bit_exact"] and report["trials"] == 16
    bad = load(lying, backend=BACKEND)
    with pytest.raises(ProbeError, match="receptive field"):
        probe(bad.local_features, images, bad.geometry, [(3, 3), (1, 1)], trials=16)


class _BatchDependent:
    """The real engine, but every row's logits also depend on the rest of its batch."""

    def __init__(self, inner):
        self.inner, self.name, self.max_batch, self.precision = inner, inner.name, inner.max_batch, inner.precision

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.inner.run(batch) + np.float32(1e-3) * batch.mean()


def test_inspect_probe_checks_the_front_locally_and_every_role_for_batch_independence(untrained, monkeypatch):
    """Feature space: the front's map is probed outside ``Geometry.affected`` (``local_features``) and both roles
    for batch independence. Pixel space: nothing is local, batch independence alone is checked, and the runtime
    relies on it on every backend (pixel certificates need no verified one), so a batch-dependent engine fails."""
    from certinfer.export import probe as probe_module
    from certinfer.runtime.bundle import load_bundle

    assert probe_module.candidate_backends(load_bundle(untrained[1])) == list(probe_module.ONNX_BACKENDS)  # any role
    pixel, feature = (probe_module.probe_bundle(path, trials=8, backends=[BACKEND])[BACKEND] for path in untrained)
    assert feature["status"] == "passed" and feature["listed_exact"] and feature["checks"]["outputs"]["trials"] == 8
    assert set(feature["batch"]) == {"front", "back"}
    assert pixel["status"] == "passed" and pixel["listed_exact"] and "skipped" in pixel["checks"]["outputs"]
    assert set(pixel["batch"]) == {"model"} and pixel["batch"]["model"]["rows"] == 4096
    real = probe_module.load_engine
    monkeypatch.setattr(probe_module, "load_engine", lambda *a, **k: _BatchDependent(real(*a, **k)))
    failed = probe_module.probe_bundle(untrained[0], trials=8, backends=[BACKEND])[BACKEND]
    assert failed["status"] == "failed" and failed["listed_exact"] and "batch" in failed["error"]


def test_speed_bench_runs_every_mode_with_identical_certificates(untrained, tmp_path):
    pixel, feature = (load(p, backend=BACKEND) for p in untrained)
    result = speed(pixel, _random_frames(6, seed=4), feature, loop_frames=2, batch=4)
    assert set(result["modes"]) == {"loop", "batched", "early-exit", "feature", "feature-loop"}
    assert set(result["levers"]) == {"total", "batching", "early exit", "feature space"}
    assert result["modes"]["loop"]["engine_rows_per_frame"] == 25 * 26 / 2
    assert result["verified"] == {"pixel": True, "feature": True}  # onnxruntime CPU: the export verified it
    assert result["modes"]["early-exit"]["engine_rows_per_frame"] <= result["modes"]["batched"]["engine_rows_per_frame"]
    result.update(machine={"cpu": "test cpu"}, backend=BACKEND)
    assert plot(result, tmp_path / "speed.png").stat().st_size > 0
    shares = levers({"loop": {"ms_per_frame": 100.0}, "batched": {"ms_per_frame": 10.0},
                     "early-exit": {"ms_per_frame": 5.0}, "feature": {"ms_per_frame": 1.0}})
    assert shares["total"] == pytest.approx(100) and shares["batching"]["share"] == pytest.approx(0.5)


class _DeviceMasking:
    """An engine that builds masked copies itself (as the torch backend does on its device)."""

    def __init__(self, engine):
        self.engine, self.name, self.max_batch, self.precision = engine, engine.name, engine.max_batch, "fp32"
        self.calls = 0

    def run(self, batch):
        return self.engine.run(batch)

    def run_masked(self, base, masks, frames, a, b, value):
        self.calls += 1
        return self.engine.run(dm.masked_copies(base, masks[a] | masks[b], frames, value))


def test_speed_bench_times_device_built_copies_where_the_engine_builds_them(untrained):
    feature = load(untrained[1], backend=BACKEND)
    feature.engines["back"] = device = _DeviceMasking(feature.engines["back"])
    result = speed(load(untrained[0], backend=BACKEND), _random_frames(3, seed=5), feature, loop_frames=1, batch=3,
                   repeats=1)
    assert list(result["modes"])[-1] == "device-copies" and device.calls > 0
    assert result["max_margin_difference"]["host/device copies"] == 0.0
    assert set(result["levers"]) == {"total", "batching", "early exit", "feature space", "device copies"}


def test_multiply_adds_are_counted_on_the_graphs(untrained, tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    assert onnx_macs(_onnx(net, 3, tmp_path / "n.onnx").read_bytes()) == 8 * 64 * 27 + 8 * 64 * 9 + 512 * 10
    front = 16 * 16 * WIDTH * 27
    back = 8 * 8 * 32 * WIDTH * 9 + 8 * 8 * 32 * 32 * 9 + 32 * len(CLASSES)  # the graph folds batch norm away
    pixel_space, feature_space = (load(p, backend=BACKEND) for p in untrained)
    pixel, feature = frame_macs(pixel_space), frame_macs(feature_space)
    copies = 25 + 25 * 24 // 2  # 25 masks of 5x5 at stride 3 on 16x16: one- and two-mask copies
    assert pixel == {"masks": 25, "copies": copies, "model": front + back, "per_certified_frame": (front + back) * copies}
    distinct = 25 + int((dm.twins(feature_space.masks, *feature_space.pairs) < 0).sum())  # nested feature masks
    assert feature["copies"] == distinct <= copies
    assert feature["per_certified_frame"] == front + back * distinct and feature["front"] == front
    points = [{"bundle": "p", "space": "pixel", "macs": pixel, "clean": 0.9, "certified": 0.4, "data": "d", "n": 5},
              {"bundle": "f", "space": "feature", "split": 1, "geometry": FRONT, "macs": feature, "clean": 0.8,
               "certified": 0.3, "data": "d", "n": 5}]
    assert plot_tradeoff(points, tmp_path / "tradeoff.png").stat().st_size > 0
    remeasured = {**points[0], "certified": 0.45, "commit": "new"}
    merged = merge([remeasured], {"points": points, "commit": "old"})
    assert merged == [{**points[1], "commit": "old"}, remeasured]  # the point measured again replaces its old one


# --- the recovery guarantee under attack -------------------------------------------------------------------------

def _synthetic(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes of coloured discs and squares on noisy backgrounds (when GTSRB is not available)."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[:HW[0], :HW[1]]
    shapes = [(rr - 7.5) ** 2 + (cc - 7.5) ** 2 < 30, (abs(rr - 7.5) < 5) & (abs(cc - 7.5) < 5)]
    colours = np.array([[220, 30, 30], [240, 200, 20]])
    x = rng.integers(0, 120, size=(4 * n_per_class, *HW, 3))
    y = np.repeat(np.arange(4), n_per_class)
    for i, c in enumerate(y):
        x[i][shapes[c % 2]] = colours[c // 2] + rng.integers(-25, 26, size=3)
    return np.clip(x, 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def data(request) -> dict:
    try:
        folder = request.getfixturevalue("gtsrb4")
    except pytest.skip.Exception:
        (xtr, ytr), (xte, yte) = _synthetic(300, seed=0), _synthetic(40, seed=1)
        return {"train": (xtr, ytr), "test": (xte, yte), "source": "synthetic"}
    from certinfer.train.data import load as load_split

    train, test = (load_split(f"folder:{folder / part}", hw=HW) for part in ("train", "test"))
    return {"train": (train.x, train.y), "test": (test.x, test.y), "source": "gtsrb4"}


def _normalize(x: np.ndarray, mean: np.ndarray, std: np.ndarray):
    return (torch.from_numpy(x).float().permute(0, 3, 1, 2) / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _train(x: np.ndarray, y: np.ndarray, mean, std, epochs: int = 20) -> tuple[nn.Module, nn.Module]:
    """Half of each batch masked by a random pair of pixel masks, half by a pair of feature masks (value 0);
    contrast and brightness jitter (GTSRB's 4-class subset has few physical signs per class)."""
    torch.set_num_threads(1)
    front, back = _nets(seed=0)
    front.train(), back.train()
    pm = torch.from_numpy(dm.mask_set(HW, THREAT, STRIDE))
    fm = torch.from_numpy(dm.feature_masks(dm.mask_boxes(HW, THREAT, STRIDE), Geometry.from_dict(FRONT)))
    xs, ys = _normalize(x, mean, std), torch.from_numpy(y)
    opt = torch.optim.Adam([*front.parameters(), *back.parameters()], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(64):
            n = len(idx)
            pix = torch.rand(n, generator=gen) < 0.5
            pmask = pm[torch.randint(len(pm), (n,), generator=gen)] | pm[torch.randint(len(pm), (n,), generator=gen)]
            fmask = fm[torch.randint(len(fm), (n,), generator=gen)] | fm[torch.randint(len(fm), (n,), generator=gen)]
            scale, shift = 0.5 + torch.rand(n, 1, 1, 1, generator=gen), 0.5 * torch.randn(n, 1, 1, 1, generator=gen)
            jitter = xs[idx] * scale + shift
            f = front(torch.where((pmask & pix[:, None, None])[:, None], 0.0, jitter))
            f = torch.where((fmask & ~pix[:, None, None])[:, None], 0.0, f)
            loss = nn.functional.cross_entropy(back(f), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return front.eval(), back.eval()


def _locations() -> list[tuple[int, int]]:
    return [(r, c) for r in range(HW[0] - 2) for c in range(HW[1] - 2)]


def _pgd(net: nn.Module, frame: np.ndarray, label: int, mean, std, steps: int = 5) -> np.ndarray:
    """A 3x3 patch at every location at once, a few signed-gradient steps against the label: on the whole frame
    and on three one-mask copies (to make the first round disagree)."""
    locs = _locations()
    where = torch.zeros(len(locs), 1, *HW, dtype=torch.bool)
    for i, (r, c) in enumerate(locs):
        where[i, :, r:r + 3, c:c + 3] = True
    base = torch.from_numpy(frame).float().permute(2, 0, 1)[None] / 255
    patch = torch.rand(len(locs), 3, *HW, generator=torch.Generator().manual_seed(label)).requires_grad_(True)
    masks = torch.from_numpy(dm.mask_set(HW, THREAT, STRIDE))
    some = masks[[0, len(masks) // 2, len(masks) - 1]]
    target = torch.full((len(locs) * 4,), label)
    for _ in range(steps):
        x = (torch.where(where, patch, base) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        copies = torch.cat([x, *(torch.where(m[None, None], 0.0, x) for m in some)])
        loss = nn.functional.cross_entropy(net(copies), target)
        grad, = torch.autograd.grad(loss, patch)
        with torch.no_grad():
            patch += 0.25 * grad.sign()
            patch.clamp_(0, 1)
    out = torch.where(where, patch, base).detach().permute(0, 2, 3, 1).numpy()
    return np.round(out * 255).astype(np.uint8)


def _patched(frame: np.ndarray, label: int, donor: np.ndarray, net, mean, std, seed: int) -> np.ndarray:
    """Every location twice: the PGD patch, and in turn a random patch, a solid one (black or white) or one copied
    from another class's image."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (r, c) in enumerate(_locations()):
        x = frame.copy()
        x[r:r + 3, c:c + 3] = (rng.integers(0, 256, size=(3, 3, 3)), np.full((3, 3, 3), 255 * (i // 3 % 2)),
                               donor[r:r + 3, c:c + 3])[i % 3]
        out.append(x)
    return np.concatenate([np.stack(out), _pgd(net, frame, label, mean, std)])


@pytest.mark.slow
def test_no_patch_changes_the_label_of_a_certified_frame(data, tmp_path):
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    mean = torch.tensor(xtr.reshape(-1, 3).mean(0) / 255, dtype=torch.float32)
    std = torch.tensor(xtr.reshape(-1, 3).std(0) / 255, dtype=torch.float32)
    front, back = _train(xtr, ytr, mean, std)
    net = nn.Sequential(front, back)
    for p in net.parameters():
        p.requires_grad_(False)
    bundles = _bundles(tmp_path, front, back, mean.tolist(), std.tolist())
    for space, path in zip(("pixel", "feature"), bundles):
        certifier = load(path, backend=BACKEND)
        verdicts = certifier(xte)
        clean = np.mean([v.label == y for v, y in zip(verdicts, yte)])
        certified = [i for i, v in enumerate(verdicts) if v.certificate.certified and v.label == yte[i]]
        assert clean > 0.5 and len(certified) >= FRAMES, (space, data["source"], clean, len(certified))
        flips, disagreed, checked = 0, 0, 0
        certified.sort(key=lambda i: verdicts[i].certificate.per_rect[THREAT].margin)  # the most fragile first
        for n, i in enumerate(certified[:FRAMES]):
            donor = xte[np.flatnonzero(yte != yte[i])[n]]
            patched = _patched(xte[i], int(yte[i]), donor, net, mean, std, seed=n)
            features, _ = certifier.timed_features(patched)
            labels = [d.label for d in certifier.certify(features)]
            flips += sum(label != verdicts[i].label for label in labels)
            preds = features.one.argmax(-1)
            disagreed += int((preds != preds[:, :1]).any(axis=1).sum())
            checked += len(patched)
        assert flips == 0, (space, flips, checked)
        assert disagreed > 0, (space, "no patch made the first round disagree: the attack is vacuous")
