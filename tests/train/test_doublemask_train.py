"""Double-masking trainer and exporter: a few seconds of training, both bundle kinds, a wrapped ONNX classifier."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from certinfer.export import ExportError
from certinfer.export.doublemask import export_checkpoint, export_classifier
from certinfer.export.onnx_export import export_onnx
from certinfer.runtime.certifier import TIE_TOLERANCE
from certinfer.runtime.defenses.doublemask import feature_masks, mask_boxes, mask_set
from certinfer.runtime.geometry import Geometry
from certinfer.runtime.loader import load
from certinfer.train.doublemask import (PRESETS, _distill_loss, config_for, feature_masks as train_feature_masks,
                                        load_teacher, masked_forward, start_from, train)
from certinfer.train.loop import save_checkpoint
from certinfer.train.models.doublemask import Back, Front, classifier, geometry

TINY = {"units": ["c3:8:1", "c3:16:2", "r1:16", "r3:16:2"], "dropout": 0.0}


def test_training_feature_masks_are_the_runtime_masks():
    """The trainer masks exactly the feature cells the runtime masks (``Geometry.affected``), at every split."""
    hw = (32, 32)
    for split in (1, 2, 3, 4):
        geo = geometry(TINY["units"], split, hw)
        ours = train_feature_masks(torch.from_numpy(mask_set(hw, "5x5", 5)), geo).numpy()
        runtime = feature_masks(mask_boxes(hw, "5x5", 5), Geometry.from_dict(geo))
        assert ours.shape[1:] == runtime.shape[1:]
        assert {m.tobytes() for m in ours} == {m.tobytes() for m in runtime}


def _changed_cells(units: list[str], split: int) -> torch.Tensor:
    """(32, 32, H', W') bool: the front's feature cells that change when one input pixel changes (torch; beyond
    float noise, as torch CPU kernels are not bit-exact across batch sizes)."""
    front = Front(classifier(44, {"units": units}).eval(), split)
    x = torch.randn(1, 3, 32, 32)
    poked = x.repeat(1024, 1, 1, 1)
    poked.view(1024, 3, 1024)[torch.arange(1024), :, torch.arange(1024)] += 1.0  # copy k: pixel k changed
    with torch.no_grad():
        base, out = front(x), front(poked)
    return ((out - base).abs() > 1e-4).any(1).view(32, 32, *out.shape[2:])


@pytest.mark.parametrize("units,split", [(TINY["units"], 2), (TINY["units"], 4), (["p4:8", "r1:16", "c3:16"], 3),
                                         (["p2:8", "c3:16:2", "r3:16"], 3)])
def test_geometry_holds_every_cell_a_pixel_can_change(units, split):
    """Poking each pixel in turn changes only the cells ``geometry`` says it reaches (the certificate's premise)."""
    geo = Geometry.from_dict(geometry(units, split, (32, 32)))
    changed = _changed_cells(units, split)
    assert tuple(changed.shape[2:]) == geo.output_hw
    for r, c in np.ndindex(32, 32):
        (r0, r1), (c0, c1) = geo.affected((1, 1), (r, c))
        reach = torch.zeros(geo.output_hw, dtype=torch.bool)
        reach[r0:r1, c0:c1] = True
        assert not (changed[r, c] & ~reach).any(), (r, c)
    assert changed.any((2, 3)).float().mean() > 0.5


def test_patch_embedding_front_hides_exactly_the_masks_own_cells():
    """A ``p4`` front: each cell sees exactly one 4x4 block, so 8x8 masks at stride 4 hide exactly 2x2 cells, in
    the trainer and in the runtime."""
    units = ["p4:8", "r1:16", "c3:16", "c3:16:2"]
    geo = geometry(units, 2, (32, 32))
    assert geo == {"rf": [4, 4], "stride": [4, 4], "padding": [0, 0], "input_hw": [32, 32], "output_hw": [8, 8]}
    runtime = feature_masks(mask_boxes((32, 32), "5x5", 4), Geometry.from_dict(geo))
    assert len(runtime) == 49 and all(m.sum() == 4 and np.ptp(np.argwhere(m), 0).tolist() == [1, 1] for m in runtime)
    ours = train_feature_masks(torch.from_numpy(mask_set((32, 32), "5x5", 4)), geo).numpy()
    assert {m.tobytes() for m in ours} == {m.tobytes() for m in runtime}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_and_splits_where_it_trains(preset):
    cfg = PRESETS[preset]
    net = classifier(44, cfg.model).eval()
    x = torch.randn(2, 3, *cfg.input_hw)
    with torch.no_grad():
        assert net(x).shape == (2, 44)
        for split in cfg.feature_splits:
            geo = geometry(cfg.model["units"], split, cfg.input_hw)
            assert tuple(net.front(x, split).shape[2:]) == tuple(geo["output_hw"])
            assert torch.allclose(Back(net, split)(Front(net, split)(x)), net(x), atol=1e-4)


def test_split_network_is_the_whole_network():
    net = classifier(43, TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for split in range(1, len(TINY["units"])):
            assert torch.allclose(Back(net, split)(Front(net, split)(x)), net(x), atol=1e-5)


def test_fine_tuning_starts_from_the_checkpoint_it_was_given(tmp_path):
    """``--init``: the weights and the input statistics come from the checkpoint; a checkpoint of another
    architecture or mask set is refused rather than half-loaded."""
    cfg = dataclasses.replace(config_for("gtsrb-cpu-finetune"), model=TINY)
    trained = classifier(44, TINY)
    meta = {"config": cfg.to_dict(), "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "command": "certinfer train"}
    save_checkpoint(trained, meta, tmp_path / "model.safetensors")
    fresh = classifier(44, TINY)
    record = start_from(fresh, tmp_path / "model.safetensors", cfg)
    assert (record["mean"], record["std"], record["command"]) == (meta["mean"], meta["std"], meta["command"])
    for k, v in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    other = dataclasses.replace(cfg, model={**TINY, "units": TINY["units"][:-1]})
    with pytest.raises(ValueError, match="architecture"):
        start_from(classifier(44, other.model), tmp_path / "model.safetensors", other)
    with pytest.raises(ValueError, match="stride"):
        start_from(classifier(44, TINY), tmp_path / "model.safetensors", dataclasses.replace(cfg, stride=5))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gtsrb_root):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dm-train")
    cfg = dataclasses.replace(config_for("gtsrb-cpu"), model=TINY, epochs=4, batch_size=32, lr=5e-3, worst_of=2,
                              feature_splits=(2,), feature_prob=0.5)
    meta = train(cfg, out, str(gtsrb_root), limit=256, monitor_every=4)
    return out, meta


@pytest.mark.slow
def test_loss_falls_and_training_resumes(trained, gtsrb_root):
    out, meta = trained
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0]
    assert meta["mask"] == {"threat": "5x5", "stride": 5, "value": 0.0, "space": "normalized input", "count": 36}
    assert {"certified", "one_mask", "clean"} <= set(meta["history"][-1]["val"])
    cfg = dataclasses.replace(config_for("gtsrb-cpu"), model=TINY, epochs=5, batch_size=32, lr=5e-3, worst_of=2,
                              feature_splits=(2,), feature_prob=0.5)  # the same config, but epochs
    resumed = train(cfg, out, str(gtsrb_root), limit=256, monitor_every=5, resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    assert resumed["resumed"][0]["epoch"] == 4


@pytest.mark.slow
def test_fine_tuning_records_the_checkpoint_it_started_from(trained, gtsrb_root, tmp_path):
    out, _ = trained
    source = json.loads((out / "model.json").read_text())
    cfg = dataclasses.replace(config_for("gtsrb-cpu"), model=TINY, epochs=1, batch_size=32, lr=1e-3, worst_of=2,
                              feature_splits=(2,), feature_prob=0.5, init=str(out / "model.safetensors"))
    tuned = train(cfg, tmp_path / "ft", str(gtsrb_root), limit=256, monitor_every=2)
    assert tuned["init"] == {"checkpoint": cfg.init, "command": source["command"], "commit": source["commit"]}
    assert (tuned["mean"], tuned["std"]) == (source["mean"], source["std"])
    resumed = train(dataclasses.replace(cfg, epochs=2), tmp_path / "ft", str(gtsrb_root), limit=256,
                    monitor_every=2, resume=True)
    assert resumed["init"] == tuned["init"] and [h["epoch"] for h in resumed["history"]] == [1, 2]


@pytest.mark.slow
def test_distillation_matches_a_teacher_under_the_same_masks(trained, gtsrb_root, tmp_path):
    """``--teacher``: the loss adds the KL divergence from the teacher's prediction on the same masked images
    (0 for a student that is the teacher); a teacher trained for another mask set or other inputs is refused."""
    out, source = trained
    cfg = dataclasses.replace(config_for("gtsrb-cpu"), model=TINY, epochs=1, batch_size=32, worst_of=2,
                              feature_splits=(2,), feature_prob=0.5, teacher=str(out / "model.safetensors"))
    teacher = load_teacher(out / "model.safetensors", cfg, source["mean"], source["std"], "cpu")
    x, m = torch.randn(6, 3, 32, 32), torch.from_numpy(mask_set((32, 32), "5x5", 5)[:6])
    with torch.no_grad():
        z = masked_forward(teacher, x, m, len(teacher.units), None, 0.0)
    assert float(_distill_loss(teacher, x, m, z, cfg)) == pytest.approx(0.0, abs=1e-2)  # bf16 autocast
    assert float(_distill_loss(teacher, x, m, torch.zeros_like(z), cfg)) > 0.01  # a flat student
    student = train(cfg, tmp_path / "kd", str(gtsrb_root), limit=256, monitor_every=2)
    assert student["config"]["teacher"] == cfg.teacher and np.isfinite(student["history"][-1]["loss"])
    with pytest.raises(ValueError, match="stride"):
        load_teacher(out / "model.safetensors", dataclasses.replace(cfg, stride=4), source["mean"], source["std"],
                     "cpu")
    with pytest.raises(ValueError, match="other inputs"):
        load_teacher(out / "model.safetensors", cfg, [0.5, 0.5, 0.5], source["std"], "cpu")


@pytest.mark.slow
def test_checkpoint_exports_to_bundles_that_load(trained, tmp_path):
    out, _ = trained
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    pixel = export_checkpoint(out / "model.safetensors", tmp_path / "pixel", limit=4)
    assert pixel["defense"]["params"] == {"space": "pixel", "stride": 5, "mask_value": 0.0, "tolerance": TIE_TOLERANCE}
    assert pixel["provenance"]["seed"] == 0 and pixel["provenance"]["commit"] and pixel["provenance"]["epochs"] >= 4
    feature = export_checkpoint(out / "model.safetensors", tmp_path / "feature", space="feature", split=2, limit=4)
    assert feature["geometry"]["rf"] == [5, 5] and feature["probe"]["bit_exact"]
    assert {e["role"] for e in feature["engines"]} == {"front", "back"}
    assert {e["file"] for e in feature["engines"] if e["format"] == "torch"} == {"classifier.safetensors"}
    for name in ("pixel", "feature"):
        certifier = load(tmp_path / name, backend="onnxruntime-cpu")
        verdicts = certifier(frames)
        assert len(verdicts) == 2 and all(v.certificate.kind == "recovery" for v in verdicts)
    assert load(tmp_path / "feature", backend="onnxruntime-cpu").trusted


@pytest.mark.slow
def test_any_onnx_classifier_is_wrapped(trained, tmp_path):
    out, meta = trained
    from certinfer.export.doublemask import load_classifier

    net, _ = load_classifier(out / "model.safetensors")
    path = tmp_path / "classifier.onnx"
    path.write_bytes(export_onnx(net, (torch.randn(2, 3, 32, 32),), ["x"], ["y"]))
    written = export_classifier(path, tmp_path / "wrapped", (32, 32), meta["classes"], meta["mean"], meta["std"],
                                "5x5", 5, "gtsrb:test", limit=4)
    assert written["provenance"]["classifier_sha256"] and written["provenance"]["metrics"]["n"] == 4
    assert len(load(tmp_path / "wrapped", backend="onnxruntime-cpu")(np.zeros((1, 32, 32, 3), np.uint8))) == 1


class _BatchDependent(torch.nn.Module):
    """Logits that depend on the other frames of the batch (a masked copy would not be judged on its own)."""

    def __init__(self, classes: int):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        z = x - x.mean(dim=0, keepdim=True)
        return z.mean(dim=(2, 3)).repeat(1, self.classes)[:, :self.classes]


@pytest.mark.slow
def test_batch_dependent_classifier_is_refused(trained, tmp_path):
    _, meta = trained
    path = tmp_path / "bad.onnx"
    path.write_bytes(export_onnx(_BatchDependent(len(meta["classes"])), (torch.randn(2, 3, 32, 32),), ["x"], ["y"]))
    with pytest.raises(ExportError, match="not batch-independent"):
        export_classifier(path, tmp_path / "bad", (32, 32), meta["classes"], meta["mean"], meta["std"], "5x5", 5,
                          "gtsrb:test", limit=4)
    with pytest.raises(ExportError, match="classes"):
        export_classifier(path, tmp_path / "bad", (32, 32), meta["classes"][:10], meta["mean"], meta["std"], "5x5",
                          5, "gtsrb:test", limit=4)
    assert not (tmp_path / "bad" / "manifest.json").exists()
