"""BagCert end to end on a small model trained here: trainer, export (parity, probe), runtime, attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import certinfer
from certinfer.bench.soundness import bagcert_soundness
from certinfer.export.bagcert import CodeMap, export_bagcert, load_scorer
from certinfer.export.bundle_writer import reseal
from certinfer.export.onnx_export import export_onnx
from certinfer.export.probe import ProbeError, expose_input_of, probe
from certinfer.runtime.geometry import Geometry
from certinfer.train import data as datasets
from certinfer.train.bagcert import TrainConfig, train

TINY = dict(kernels=(3, 1, 1, 1), strides=(1, 2, 1, 1), widths=(16, 32, 32, 32), stem_width=16)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gtsrb4):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(dataset=f"folder:{gtsrb4}", model=dict(TINY), epochs=20, batch_size=64, margin=0.4, sigma=0.0,
                      bf16=False, warmup_epochs=0.5)
    metrics = train(cfg, out, device="cpu")
    bundle = tmp_path_factory.mktemp("bundle") / "b"
    manifest = export_bagcert(out / "model.safetensors", bundle, threat="5x5", probe_trials=32)
    return {"metrics": metrics, "checkpoint": out / "model.safetensors", "bundle": bundle, "manifest": manifest,
            "test": datasets.load(f"folder:{gtsrb4}/test")}


@pytest.mark.slow
def test_training_learns_and_certifies(trained):
    m = trained["metrics"]["test"]
    assert m["clean"] > 0.6, m
    assert m["certified"] > 0.2, m
    assert trained["metrics"]["test_condition_3.3"]["certified"] <= m["certified"]


@pytest.mark.slow
def test_export_manifest_parity_and_runtime_agree_with_torch(trained):
    man = trained["manifest"]
    assert man["parity"]["torch_vs_onnxruntime-cpu"]["binary_disagreements"] <= \
        man["parity"]["torch_vs_onnxruntime-cpu"]["cells_within_eps"]
    assert man["probe"]["bit_exact"] and man["probe"]["trials"] == 32
    backends = man["parity"]["backends"]  # the other backends here against onnxruntime CPU, GPU ones absent
    assert backends["reference"] == "onnxruntime-cpu" and backends["frames"] == 160
    assert set(backends["compared"]) | set(backends["absent"]) >= {"onnxruntime-cuda", "tensorrt", "torch-cuda"}
    assert man["provenance"]["metrics"]["n"] == len(trained["test"].y)
    cert = certinfer.load(trained["bundle"], backend="onnxruntime-cpu")
    verdicts = cert(trained["test"].x[:16])
    scorer, meta = load_scorer(trained["checkpoint"])
    x = cert.prepare(trained["test"].x[:16])
    with torch.no_grad():
        votes = (scorer(torch.from_numpy(x)) >= 0).sum(dim=(2, 3)).numpy()
    assert [v.label for v in verdicts] == votes.argmax(1).tolist()
    assert all(v.backend == "onnxruntime-cpu" and v.certificate.threat == "5x5" for v in verdicts)


@pytest.mark.slow
def test_certified_images_survive_patch_attacks_at_every_location(trained):
    data = f"folder:{trained['test'].name.split(':', 1)[1]}"
    report = bagcert_soundness(trained["bundle"], trained["checkpoint"], data, images=3, threat="5x5,2x12",
                               pgd_steps=10)
    assert report["certified_frames_attacked"] == 3, "too few certified frames: the attack would test little"
    assert report["patched_frames_evaluated"] == 3 * 4 * (28 * 28 + 31 * 21)
    assert report["total_flips"] == 0, report["flips"]


def test_probe_catches_a_receptive_field_larger_than_claimed():
    torch.manual_seed(0)
    from certinfer.train.bagcert import build_scorer

    scorer = build_scorer(3, TINY).eval()  # real RF 5, stride 2, padding 2
    true = Geometry(**scorer.cfg.geometry((16, 16)))
    model = expose_input_of(export_onnx(CodeMap(scorer, 0.05), (torch.zeros(2, 3, 16, 16),), ["input"], ["scores"]),
                            "GreaterOrEqual")
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

    def run(b):
        return sess.run(["preactivation"], {"input": b})[0].transpose(0, 2, 3, 1)

    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32)
    report = probe(run, x, true, [(1, 1), (3, 3)], trials=24)
    assert report["patches_that_changed_outputs"] == 24
    lied = Geometry((3, 3), true.stride, (1, 1), true.input_hw, true.output_hw)
    with pytest.raises(ProbeError, match="receptive field"):
        probe(run, x, lied, [(1, 1), (3, 3)], trials=24)


@pytest.mark.slow
def test_certify_cli_shards_merge_to_the_whole(trained, tmp_path, capsys):
    from certinfer.cli import main

    data = f"folder:{trained['test'].name.split(':', 1)[1]}"

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["certify", *args])
        assert e.value.code == 0, capsys.readouterr().err

    whole, parts = tmp_path / "whole.json", [tmp_path / f"s{i}.json" for i in range(2)]
    run(str(trained["bundle"]), "--data", data, "--threat", "5x5,area:24", "--out", str(whole),
        "--plot", str(tmp_path / "whole.png"))
    for i, p in enumerate(parts):
        run(str(trained["bundle"]), "--data", data, "--threat", "5x5,area:24", "--shard", f"{i}/2", "--out", str(p))
    run("--merge", str(parts[0]), "--merge", str(parts[1]), "--out", str(tmp_path / "merged.json"))
    import json

    w, m = json.loads(whole.read_text()), json.loads((tmp_path / "merged.json").read_text())
    assert w["n"] == m["n"] == len(trained["test"].y)
    assert w["variants"] == m["variants"] and w["clean"] == m["clean"]
    per = w["certified_accuracy_per_rect"]["3.2"]
    assert {"5x5", "1x24", "24x1", "4x6", "10x10"} <= set(per)
    # the threat as a whole is certified only where every one of its rectangles is
    assert w["certified_accuracy"]["3.2"] <= min(per[k] for k in ("5x5", "4x6", "3x8"))
    assert w["certified_accuracy"]["3.3"] <= w["certified_accuracy"]["3.2"]
    assert (tmp_path / "whole.png").stat().st_size > 1000


@pytest.mark.slow
def test_backends_not_probed_bit_exact_distrust_cells_near_the_threshold(trained, tmp_path):
    import json
    import shutil

    strict = tmp_path / "strict"
    shutil.copytree(trained["bundle"], strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["probe"]["exact_backends"] = []  # as for an fp16 engine that failed the bit-exact probe
    (strict / "manifest.json").write_text(json.dumps(manifest))
    reseal(strict)  # an edit made on purpose: unsealed, the bundle would be refused
    frames = trained["test"].x
    trusted = certinfer.load(trained["bundle"], backend="onnxruntime-cpu")
    careful = certinfer.load(strict, backend="onnxruntime-cpu")
    assert trusted.trusted and not careful.trusted
    code = trusted.local_features(trusted.prepare(frames))
    assert ((code >> 1) & 1).any(), "no cell near the threshold: the policy would be untested"
    for a, b in zip(trusted(frames), careful(frames)):
        assert a.label == b.label
        assert b.certificate.per_rect["5x5"].margin <= a.certificate.per_rect["5x5"].margin
        assert not (b.status == "certified" and a.status != "certified")
    assert sum(v.status == "certified" for v in careful(frames)) < sum(v.status == "certified" for v in trusted(frames))


@pytest.mark.slow
def test_inspect_probe_catches_an_edited_geometry(trained, tmp_path, capsys):
    import json
    import shutil

    from certinfer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["inspect", "--probe", str(trained["bundle"])])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "probe       onnxruntime-cpu" in out
    assert "probe       torch-cpu: passed" in out  # the exported torch engine, rebuilt by train.models.build
    edited = tmp_path / "edited"
    shutil.copytree(trained["bundle"], edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["geometry"]["rf"] = [3, 3]  # claims a smaller receptive field: certificates would be unsound
    manifest["geometry"]["padding"] = [1, 1]
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--probe", str(edited)])
    assert e.value.code == 1 and "manifest was modified after export" in capsys.readouterr().err
    reseal(edited)  # whoever edited it rewrote the digest too: only the probe on the engine itself can tell
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--probe", str(edited)])
    out, err = capsys.readouterr()
    assert e.value.code == 1 and "probe       onnxruntime-cpu: FAILED" in out
    assert "receptive field exceeds" in err


@pytest.mark.slow
def test_torch_cpu_backend_matches_onnxruntime_cpu(trained):
    from certinfer.runtime.bundle import load_bundle
    from certinfer.runtime.engines import load_engine
    from certinfer.train.models import build

    bundle = load_bundle(trained["bundle"])
    assert [e["format"] for e in bundle.manifest["engines"]] == ["onnx", "torch"]
    assert trained["manifest"]["parity"]["backends"]["compared"]["torch-cpu"]["unflagged_flips"] == 0
    cert = certinfer.load(trained["bundle"], backend="onnxruntime-cpu")
    x = cert.prepare(trained["test"].x[:64])
    ref = load_engine(bundle, "onnxruntime-cpu").run(x)
    got = load_engine(bundle, "torch-cpu", builder=build).run(x)
    assert got.dtype == np.uint8 and got.shape == ref.shape
    near = ((ref | got) >> 1) & 1
    assert np.array_equal((ref & 1)[near == 0], (got & 1)[near == 0])  # binary maps equal off the threshold
    assert (ref != got).mean() < 1e-3
