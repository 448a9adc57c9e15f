"""Resuming training: a run cut short and resumed ends with the weights of one run straight through (every skeleton
trainer, on a few hundred real GTSRB images), and what a resume refuses."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from certinfer.train import bagcert, cropping, ibp, masking, scalecert, trainer
from certinfer.train.models.ibp import arch

torch.set_num_threads(1)

CLASSES = (1, 12, 13, 38)  # speed limit 30, priority road, yield, keep right


@pytest.fixture(scope="module")
def small_gtsrb(tmp_path_factory, gtsrb_root) -> str:
    """A GTSRB data folder of 320 real training images (4 classes, 10 images from each of 8 tracks per class: 32
    tracks to hold out from) and 80 test images, in the layout of ``gtsrb/gtsrb32.npz``."""
    root = tmp_path_factory.mktemp("small-gtsrb")
    with np.load(gtsrb_root / "gtsrb" / "gtsrb32.npz", allow_pickle=False) as d:
        y, track, names = d["y_train"], d["train_track"], d["class_names"]
        train = [i for c in CLASSES for t in np.unique(track[y == c])[:8]
                 for i in np.flatnonzero((y == c) & (track == t))[:10]]
        test = [i for c in CLASSES for i in np.flatnonzero(d["y_test"] == c)[:20]]
        relabel = {c: k for k, c in enumerate(CLASSES)}
        (root / "gtsrb").mkdir()
        np.savez(root / "gtsrb" / "gtsrb32.npz", x_train=d["x_train"][train],
                 y_train=np.array([relabel[int(v)] for v in y[train]]), train_track=track[train],
                 x_test=d["x_test"][test], y_test=np.array([relabel[int(v)] for v in d["y_test"][test]]),
                 class_names=names[list(CLASSES)])
    return str(root)


@dataclass
class Case:
    module: object
    cfg: object
    cut: int  # epochs done when the first piece is stopped


CASES = {
    "bagcert": Case(bagcert, bagcert.TrainConfig(epochs=3, batch_size=32, jitter=0.4, sigma=0.1,
                                                 model=dict(kernels=(3, 1), strides=(1, 2), widths=(8, 8),
                                                            stem_width=8)), cut=2),
    "masking-bagnet": Case(masking, masking.TrainConfig(epochs=3, batch_size=32, jitter=0.4, mask_loss=0.5,
                                                        eval_every=100,
                                                        model=dict(kernels=(3, 3, 3, 1), strides=(1, 1, 2, 1),
                                                                   widths=(8, 8, 16, 16), stem_width=8)), cut=2),
    "cropping": Case(cropping, cropping.TrainConfig(epochs=3, batch_size=32, jitter=0.4, eval_crops=4,
                                                    eval_images=20, eval_every=100,
                                                    model=dict(widths=(8, 8, 8, 8), crop_hw=(10, 10))), cut=2),
    # the cut falls between the dense epoch and the SIN fine-tuning (worst of 2 windows: more draws to restore)
    "scalecert": Case(scalecert, scalecert.TrainConfig(epochs=3, dense_epochs=1, batch_size=32, worst_of=2,
                                                       eval_images=20, eval_every=100,
                                                       model=dict(stem=8, widths=(8, 16), strides=(2, 2),
                                                                  blocks=(1, 1), top_k=0.2)), cut=1),
    # guided: a second network and optimizer (the U-net) and a torch.Generator; the cut falls inside the eps ramp
    "ibp-guided": Case(ibp, ibp.TrainConfig(model=arch("small", (32, 32)), strategy="guided", k=2, epochs=3,
                                            batch_size=32, ramp_start=0.5, ramp_epochs=2.0, lr_decay_every=1,
                                            unet_width=4, eval_images=20, val_images=10, eval_every=100), cut=2),
}


class _Killed(Exception):
    pass


def _cut_after(monkeypatch, module, epochs: int) -> None:
    """Make ``module``'s training stop (as if killed) when it begins epoch ``epochs`` (0-based)."""
    real = module.train_epoch

    def train_epoch(run, epoch, *args, **kwargs):
        if epoch == epochs:
            raise _Killed
        return real(run, epoch, *args, **kwargs)

    monkeypatch.setattr(module, "train_epoch", train_epoch)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "ibp-guided" else n
                                  for n in sorted(CASES)])
def test_a_run_cut_short_and_resumed_ends_bit_identical(name, small_gtsrb, tmp_path, monkeypatch):
    case = CASES[name]
    straight = tmp_path / "straight"
    case.module.train(case.cfg, straight, small_gtsrb, "cpu", "custom", "straight")
    pieces = tmp_path / "pieces"
    with monkeypatch.context() as m:
        _cut_after(m, case.module, case.cut)
        with pytest.raises(_Killed):
            case.module.train(case.cfg, pieces, small_gtsrb, "cpu", "custom", "first piece")
    assert json.loads((pieces / "last.json").read_text())["epoch"] == case.cut
    assert not (pieces / "model.safetensors").exists()
    metrics = case.module.train(case.cfg, pieces, small_gtsrb, "cpu", "custom", "second piece", resume=True)

    a, b = _weights(straight), _weights(pieces)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    meta = json.loads((pieces / "model.json").read_text())
    assert meta["resumed"] == [{"epoch": case.cut, "epochs_before": 3, "epochs": 3,
                                "commit": meta["resumed"][0]["commit"], "command": "second piece"}]
    assert meta["command"] == "second piece"
    first_piece = metrics["history"][case.cut - 1]["minutes"]
    assert meta["metrics"]["train_minutes"] >= first_piece > 0
    straight_losses = [h["loss"] for h in json.loads((straight / "metrics.json").read_text())["history"]]
    assert [h["loss"] for h in metrics["history"]] == straight_losses


def test_double_masking_cut_short_and_resumed_ends_bit_identical(small_gtsrb, tmp_path, monkeypatch):
    """Double masking has its own loop, on the same resume state."""
    from certinfer.train import doublemask

    cfg = doublemask.TrainConfig(model={"units": ["c3:8:1", "c3:16:2", "r1:16", "r3:16:2"], "dropout": 0.0},
                                 epochs=3, batch_size=32, worst_of=2, feature_splits=(2,), feature_prob=0.5)
    doublemask.train(cfg, tmp_path / "straight", small_gtsrb, monitor_every=100)
    real = doublemask._epoch

    def epoch(run, model, opt, data, masks, geos, meta, schedule, teacher):
        if meta["epoch"] == 2:
            raise _Killed
        return real(run, model, opt, data, masks, geos, meta, schedule, teacher)

    with monkeypatch.context() as m:
        m.setattr(doublemask, "_epoch", epoch)
        with pytest.raises(_Killed):
            doublemask.train(cfg, tmp_path / "pieces", small_gtsrb, monitor_every=100)
    meta = doublemask.train(cfg, tmp_path / "pieces", small_gtsrb, command="again", resume=True, monitor_every=100)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "pieces")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta["resumed"][0] | {"commit": None} == {"epoch": 2, "epochs_before": 3, "epochs": 3, "commit": None,
                                                     "command": "again"}
    with pytest.raises(ValueError, match=r"config differs \(worst_of 2 -> 1\)"):
        doublemask.train(replace(cfg, worst_of=1), tmp_path / "pieces", small_gtsrb, resume=True)


@pytest.fixture(scope="module")
def finished(small_gtsrb, tmp_path_factory) -> tuple[Path, bagcert.TrainConfig]:
    """A finished two-epoch bagcert run (its resume state included)."""
    cfg = bagcert.TrainConfig(epochs=2, batch_size=64, model=dict(kernels=(3, 1), strides=(1, 2), widths=(8, 8),
                                                                  stem_width=8))
    out = tmp_path_factory.mktemp("finished")
    bagcert.train(cfg, out, small_gtsrb, "cpu", "custom", "first")
    return out, cfg


def test_a_finished_run_trains_longer_with_more_epochs(finished, small_gtsrb, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    before = json.loads((out / "model.json").read_text())
    metrics = bagcert.train(replace(finished[1], epochs=3), out, small_gtsrb, "cpu", "custom", "longer", resume=True)
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert metrics["history"][:2] == before["metrics"]["history"]
    meta = json.loads((out / "model.json").read_text())
    assert meta["resumed"][0] | {"commit": None} == {"epoch": 2, "epochs_before": 2, "epochs": 3, "commit": None,
                                                     "command": "longer"}
    assert meta["commit"] == before["commit"] and meta["config"]["epochs"] == 3
    assert meta["metrics"]["train_minutes"] > before["metrics"]["train_minutes"]
    assert json.loads((out / "last.json").read_text())["step"] == 3 * (310 // 64)  # 310 fit images (one track held)


@pytest.mark.parametrize("change, message", [
    (dict(lr=2e-3), r"config differs \(lr 0.001 -> 0.002\); only --epochs may change"),
    (dict(epochs=1), "it has trained 2 epochs, more than --epochs 1"),
])
def test_a_different_config_is_refused(finished, small_gtsrb, change, message):
    with pytest.raises(ValueError, match=message):
        bagcert.train(replace(finished[1], **change), finished[0], small_gtsrb, "cpu", "custom", "", resume=True)
    with pytest.raises(ValueError, match="it was trained with --preset custom, not gtsrb-cpu"):
        bagcert.train(finished[1], finished[0], small_gtsrb, "cpu", "gtsrb-cpu", "", resume=True)
    with pytest.raises(ValueError, match="it holds a bagcert run, not masking"):
        trainer.check_resume(finished[0], "masking", "custom", finished[1], 1)
    with pytest.raises(ValueError, match="it trained in 1 processes, this run has 2"):
        trainer.check_resume(finished[0], "bagcert", "custom", finished[1], 2)


def test_nothing_to_resume_from_is_said_in_one_line(tmp_path, capsys):
    from certinfer.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "bagcert", "--out", str(tmp_path / "new"), "--threads", "1", "--resume"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"certinfer: error: nothing to resume from: no {tmp_path / 'new' / 'last.safetensors'} " \
                  "(start without --resume)"


@pytest.mark.parametrize("defense", ["bagcert", "cropping", "ibp", "masking", "scalecert", "doublemask"])
def test_every_train_command_takes_resume(defense):
    import importlib

    from typer.testing import CliRunner

    cli = importlib.import_module(f"certinfer.train.{defense}").cli
    assert "--resume" in CliRunner().invoke(cli, ["--help"]).output


def test_the_recorded_command_says_resume():
    seen = {}

    def fake_train(cfg, out, data_dir, device, preset, command, resume=False):
        seen.update(command=command, resume=resume)
        return {}

    from typer.testing import CliRunner

    app = trainer.trainer_cli("bagcert", fake_train, bagcert.PRESETS, "gtsrb-cpu", "test",
                              (trainer.EPOCHS, trainer.THREADS))
    assert CliRunner().invoke(app, ["--out", "runs/x", "--resume", "--epochs", "40"]).exit_code == 0
    assert seen == {"command": "certinfer train bagcert --preset gtsrb-cpu --epochs 40 --resume --out runs/x",
                    "resume": True}
    assert CliRunner().invoke(app, ["--out", "runs/x"]).exit_code == 0
    assert seen == {"command": "certinfer train bagcert --preset gtsrb-cpu --out runs/x", "resume": False}


def _net_and_optimizers(seed: int, steps: int) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
    """A small network with two optimizers (Adam, SGD with momentum) after ``steps`` steps, learning rates halved."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opts = [torch.optim.Adam(net[0].parameters(), lr=1e-3), torch.optim.SGD(net[2].parameters(), lr=0.1,
                                                                            momentum=0.9)]
    for _ in range(steps):
        net(torch.randn(5, 3)).sum().backward()
        for opt in opts:
            opt.step()
            opt.param_groups[0]["lr"] *= 0.5
    return net, opts


def test_state_round_trips_and_refuses_files_of_different_epochs(tmp_path):
    net, opts = _net_and_optimizers(0, steps=2)
    rng, gen = np.random.default_rng(3), torch.Generator().manual_seed(4)
    rng.random(7), torch.rand(2), torch.rand(2, generator=gen)
    trainer.save_state(tmp_path, net, opts, {"epoch": 1, "history": []}, rng, [gen])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors", "optimizer.safetensors",
                                                          "rng.json"]
    expected = (rng.random(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    twin, twin_opts = _net_and_optimizers(1, steps=0)
    twin_rng, twin_gen = np.random.default_rng(), torch.Generator()
    assert trainer.load_state(tmp_path, twin, twin_opts, twin_rng, [twin_gen])["epoch"] == 1
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))
    for opt, twin_opt in zip(opts, twin_opts):
        mine, theirs = opt.state_dict(), twin_opt.state_dict()
        assert mine["param_groups"] == theirs["param_groups"]
        assert all(torch.equal(mine["state"][i][k], theirs["state"][i][k]) for i in mine["state"]
                   for k in mine["state"][i])
    assert (twin_rng.random(), torch.rand(1).item(), torch.rand(1, generator=twin_gen).item()) == expected

    rngs = json.loads((tmp_path / "rng.json").read_text())
    (tmp_path / "rng.json").write_text(json.dumps({**rngs, "epoch": 2}))
    with pytest.raises(ValueError, match=r"of different epochs \(1, 2; the run was stopped while saving\)"):
        trainer.load_state(tmp_path, twin, twin_opts, twin_rng, [twin_gen])


def test_a_double_masking_state_from_before_loads(tmp_path):
    """The files double masking wrote before the shared resume state: GROUP.INDEX.NAME and torch_rng in
    optimizer.safetensors, numpy's state alone in rng.json, no epoch tags."""
    from certinfer.train.loop import save_checkpoint

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    rng = np.random.default_rng(5)
    save_checkpoint(net, {"epoch": 4, "history": []}, tmp_path / "last.safetensors")
    state = {f"0.{i}.{name}": torch.as_tensor(v).contiguous()
             for i, p in enumerate(opt.param_groups[0]["params"]) for name, v in opt.state[p].items()}
    save_file({**state, "torch_rng": torch.get_rng_state()}, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "rng.json").write_text(json.dumps(rng.bit_generator.state))
    expected = (rng.random(), torch.rand(1).item())

    torch.manual_seed(1)
    twin = torch.nn.Linear(3, 2)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    twin_rng = np.random.default_rng()
    assert trainer.load_state(tmp_path, twin, [twin_opt], twin_rng)["epoch"] == 4
    assert torch.equal(twin.weight, net.weight)
    assert all(torch.equal(twin_opt.state[q][k], opt.state[p][k])
               for p, q in zip(net.parameters(), twin.parameters()) for k in opt.state[p])
    assert (twin_rng.random(), torch.rand(1).item()) == expected
