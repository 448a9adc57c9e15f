"""BagCert training pieces: losses, straight-through gradient, presets and their geometry, torchrun/DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from certinfer.runtime.geometry import Geometry
from certinfer.train.bagcert import PRESETS, build_scorer
from certinfer.train.losses import margin_loss, one_hot_penalty
from certinfer.train.models.bagcert import RegionScorerConfig, heaviside, rf_kernels

torch.set_num_threads(1)


def test_margin_loss_is_the_clipped_smallest_vote_gap():
    s = torch.zeros(1, 3, 2, 2)
    s[0, 0] = 1  # true class: every cell
    s[0, 1, 0, 0] = 1  # rival: one cell of four
    y = torch.tensor([0])
    assert margin_loss(s, y, margin=1.0).item() == pytest.approx(-0.75)  # min(1 - 0.25, 1 - 0)
    assert margin_loss(s, y, margin=0.5).item() == pytest.approx(-0.5)  # clipped at M
    assert margin_loss(s, torch.tensor([1]), margin=1.0).item() == pytest.approx(0.75)


def test_one_hot_penalty_range():
    one_hot = torch.zeros(1, 4, 2, 2)
    one_hot[0, 2] = 1
    assert one_hot_penalty(one_hot).item() == pytest.approx(-1.0)
    assert one_hot_penalty(torch.ones(1, 4, 2, 2)).item() == pytest.approx(0.0)


def test_heaviside_forward_binary_backward_sigmoid():
    z = torch.tensor([-2.0, -1e-6, 0.0, 3.0], requires_grad=True)
    out = heaviside(z)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0]
    out.sum().backward()
    s = torch.sigmoid(z.detach())
    assert torch.allclose(z.grad, s * (1 - s))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_match_their_geometry(preset):
    cfg = PRESETS[preset]
    hw = tuple(cfg.input_hw)
    model_cfg = dict(cfg.model)
    if preset == "paper" or preset.startswith(("cifar10-rf", "imagenet")):  # GPU models: a narrow twin
        model_cfg.update(widths=(8,) * 8, stem_width=8)
    scorer = build_scorer(7, model_cfg).eval()
    with torch.no_grad():
        out = scorer(torch.zeros(1, 3, *hw))
    g = Geometry(**scorer.cfg.geometry(hw))
    assert out.shape == (1, 7) + g.output_hw
    if preset.startswith(("cifar10-rf", "imagenet-rf")):
        assert g.rf[0] == int(preset.rsplit("rf", 1)[1])


def test_rf_tables_give_their_receptive_fields():
    for rf in (5, 7, 9, 11, 13):
        cfg = RegionScorerConfig(num_classes=2, kernels=rf_kernels(rf))
        assert cfg.geometry((32, 32))["rf"] == [rf, rf]
    for rf in (17, 25, 29):
        cfg = RegionScorerConfig(num_classes=2, kernels=rf_kernels(rf, imagenet=True), strides=(2, 1, 2, 1, 1, 1, 1, 1))
        assert cfg.geometry((224, 224))["rf"] == [rf, rf] and cfg.geometry((224, 224))["output_hw"] == [56, 56]
    assert PRESETS["paper"].model["widths"] == (768,) * 8 and PRESETS["paper"].epochs == 350


def test_shake_shake_paths_keep_the_receptive_field():
    from certinfer.export.probe import probe

    torch.manual_seed(0)
    model = build_scorer(3, dict(kernels=(3, 1, 3, 1), strides=(1, 2, 1, 1), widths=(8,) * 4, stem_width=8,
                                 shake_shake=True)).eval()
    g = Geometry(**model.cfg.geometry((16, 16)))

    def run(b):
        with torch.no_grad():
            return model(torch.from_numpy(b)).permute(0, 2, 3, 1).numpy()

    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    # locality only: eager torch on CPU picks conv algorithms by batch size, so it is not batch-invariant
    report = probe(run, x, g, [(1, 1), (2, 3)], trials=16, batch_invariance=False)
    assert report["patches_that_changed_outputs"] == 16


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_with_ddp(tmp_path: Path):
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for c in range(2):
            folder = tmp_path / "data" / part / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(24):
                img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                img[..., c] += 150  # class 0 reddish, class 1 greenish
                Image.fromarray(img).save(folder / f"{i}.png")
    out = tmp_path / "run"
    script = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from pathlib import Path\n"
        "from certinfer.train.bagcert import TrainConfig, train\n"
        f"cfg = TrainConfig(dataset='folder:{tmp_path / 'data'}', epochs=2, batch_size=8, bf16=False, sigma=0.0,\n"
        "    model=dict(kernels=(3, 1), strides=(1, 2), widths=(8, 8), stem_width=8), input_hw=(16, 16))\n"
        f"train(cfg, Path('{out}'), device='cpu')\n")
    (tmp_path / "job.py").write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29517", str(tmp_path / "job.py")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = json.loads((out / "model.json").read_text())
    assert meta["world_size"] == 2 and (out / "model.safetensors").stat().st_size > 0


def test_recorded_command_keeps_zero_and_names_options_as_the_cli_does():
    from certinfer.train.loop import command_line

    cmd = command_line("scalecert", "gtsrb-cpu", Path("runs/x"), epochs=None, seed=0, dense_epochs=0, threads=1)
    assert cmd == "certinfer train scalecert --preset gtsrb-cpu --seed 0 --dense-epochs 0 --threads 1 --out runs/x"


def _fake_gtsrb(root: Path, classes: int = 4, tracks: int = 3, per_track: int = 5) -> Path:
    """A GTSRB-shaped data folder (gtsrb/gtsrb32.npz) with ``tracks`` tracks of ``per_track`` images per class."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), tracks * per_track)
    track = np.tile(np.repeat(np.arange(tracks), per_track), classes)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    (root / "gtsrb").mkdir(parents=True)
    np.savez(root / "gtsrb" / "gtsrb32.npz", x_train=x, y_train=y, train_track=track, x_test=x[:8], y_test=y[:8],
             class_names=np.array([f"c{i}" for i in range(classes)]))
    return root


def test_validation_holds_out_whole_tracks_of_the_data_dir_given(tmp_path: Path, monkeypatch):
    from certinfer.train.bagcert import TrainConfig, train
    from certinfer.train.trainer import start

    data = _fake_gtsrb(tmp_path / "data")
    monkeypatch.setenv("CERTINFER_DATA", str(tmp_path / "elsewhere"))  # not where the data is: --data-dir is
    cfg = TrainConfig(epochs=1, batch_size=16, bf16=False, sigma=0.0,
                      model=dict(kernels=(3, 1), strides=(1, 2), widths=(8, 8), stem_width=8))
    run = start("bagcert", cfg, str(data), device="cpu")
    tracks = run.train.groups
    assert len(run.val) and not set(tracks[run.val]) & set(tracks[run.fit])
    assert sorted([*run.fit, *run.val]) == list(range(60))
    metrics = train(cfg, tmp_path / "run", data_dir=str(data), device="cpu")
    assert metrics["test"]["n"] == 8
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["dataset"]["validation"] == "5% of tracks" and meta["dataset"]["train"] == "gtsrb:train"


def test_the_train_command_records_its_options_in_one_order(tmp_path: Path):
    from typer.testing import CliRunner

    from certinfer.train.scalecert import PRESETS, cli
    from certinfer.train.trainer import EPOCHS, LIMIT, SEED, THREADS, Override, trainer_cli

    seen = {}

    def fake_train(cfg, out, data_dir, device, preset, command):
        seen.update(cfg=cfg, command=command, data_dir=data_dir)
        return {"test": {"clean": 1.0}}

    overrides = (EPOCHS, SEED, LIMIT, THREADS, Override("init", str, "init"), Override("dense_epochs", int, "dense"))
    app = trainer_cli("scalecert", fake_train, PRESETS, "gtsrb-cpu", "test", overrides)
    out = tmp_path / "x"
    result = CliRunner().invoke(app, ["--dense-epochs", "0", "--threads", "1", "--out", str(out), "--seed", "0",
                                      "--data-dir", "d"])
    assert result.exit_code == 0, result.output
    assert seen["command"] == f"certinfer train scalecert --preset gtsrb-cpu --seed 0 --threads 1 " \
                              f"--dense-epochs 0 --out {out}"
    assert seen["cfg"].seed == 0 and seen["cfg"].dense_epochs == 0 and seen["cfg"].epochs == PRESETS["gtsrb-cpu"].epochs
    assert seen["data_dir"] == "d" and json.loads(result.output) == {"clean": 1.0}
    assert "--dense-epochs" in CliRunner().invoke(cli, ["--help"]).output  # the real command has the same options
