"""BagCert trainer: region scorer + Heaviside + margin loss (Sec. 3.3), Adam with warmup and cosine decay."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from certinfer.threat import parse
from certinfer.runtime.defenses import bagcert as certifier
from certinfer.runtime.geometry import Geometry
from certinfer.train import data as datasets
from certinfer.train.losses import bagcert_loss
from certinfer.provenance import git_commit
from certinfer.train.loop import (Dist, augment, command_line, cosine_lr, epoch_batches, normalize, photometric,
                                  preset_config, save_checkpoint, seed_everything, setup_distributed,
                                  teardown_distributed, to_nchw)
from certinfer.train.models.bagcert import RegionScorer, RegionScorerConfig, heaviside, rf_kernels

# RF 5 at output stride 2: a 5x5 patch touches at most 5x5 of the 16x16 cells (9.8% of the votes).
_CPU_SCORER = dict(kernels=(3, 1, 1, 1, 1, 1, 1, 1), strides=(1, 2, 1, 1, 1, 1, 1, 1),
                   widths=(48,) + (128,) * 7, stem_width=48)


@dataclass
class TrainConfig:
    dataset: str = "gtsrb"
    model: dict = field(default_factory=lambda: dict(_CPU_SCORER))
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    margin: float = 0.3  # M: twice the largest affected share of the score map we want to certify
    sigma: float = 0.1  # one-hot penalty weight (1.0 collapses small runs onto one class)
    crop_pad: int = 4
    flips: bool = False  # off for traffic signs: a mirrored "turn left" is "turn right"
    jitter: float = 0.0  # brightness/contrast jitter (GTSRB's lighting varies a lot)
    bf16: bool = True  # CPU autocast; the exported graph is fp32
    seed: int = 0
    eval_threat: str = "5x5"
    input_hw: tuple[int, int] = (32, 32)  # image-folder datasets are resized to this

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, TrainConfig] = {
    # RF 5 at stride 2 (the first default): trains on one CPU core in about an hour.
    "gtsrb-cpu": TrainConfig(),
    # The same scorer with lighting jitter, 20 epochs.
    "gtsrb-cpu-jitter": TrainConfig(epochs=20, jitter=0.4),
    # The default bundle. RF 7 at stride 2: more context per cell, a 5x5 patch touches up to 6x6 cells
    # (14% of the votes); lighting jitter against overfitting to GTSRB's ~1,300 physical signs.
    "gtsrb-cpu-rf7": TrainConfig(epochs=20, jitter=0.4,
                                 model=dict(_CPU_SCORER, kernels=(3, 3, 1, 1, 1, 1, 1, 1),
                                            strides=(1, 1, 2, 1, 1, 1, 1, 1))),
    # CIFAR-10 (our copy is JPEG-compressed): the same scorer, flips on, 10 epochs for about an hour on one core.
    "cifar10-cpu": TrainConfig(dataset="cifar10", epochs=10, flips=True, margin=0.3, sigma=0.0),
    # The paper's CIFAR-10 setting (A.1.1): RF 7, width 768, shake-shake, 350 epochs, batch 96. A GPU job.
    "paper": TrainConfig(dataset="cifar10", epochs=350, batch_size=96, warmup_epochs=10, margin=0.5, sigma=0.0,
                         flips=True, bf16=False,
                         model=dict(kernels=rf_kernels(7), strides=(1,) * 8, widths=(768,) * 8, stem_width=768,
                                    shake_shake=True)),
    # The paper's receptive-field sweep on CIFAR-10 (A.1.1, RF 5..13), same training as "paper".
    **{f"cifar10-rf{rf}": TrainConfig(dataset="cifar10", epochs=350, batch_size=96, warmup_epochs=10, margin=0.5,
                                      sigma=0.0, flips=True, bf16=False,
                                      model=dict(kernels=rf_kernels(rf), strides=(1,) * 8, widths=(768,) * 8,
                                                 stem_width=768, shake_shake=True))
       for rf in (5, 7, 9, 11, 13)},
    # ImageNet-style (A.1.2): strides 2 in blocks 1 and 3, RF 17/25/29, for a folder:ROOT with train/ and test/.
    **{f"imagenet-rf{rf}": TrainConfig(dataset="folder:imagenet", epochs=60, batch_size=64, lr=3.3e-4,
                                       warmup_epochs=10, margin=0.25, sigma=1.0, crop_pad=0, flips=True, bf16=False,
                                       input_hw=(224, 224),
                                       model=dict(kernels=rf_kernels(rf, imagenet=True),
                                                  strides=(2, 1, 2, 1, 1, 1, 1, 1),
                                                  widths=(64, 64, 128, 128, 256, 256, 512, 512), stem_width=64))
       for rf in (17, 25, 29)},
}


def build_scorer(num_classes: int, model: dict) -> RegionScorer:
    return RegionScorer(RegionScorerConfig(num_classes=num_classes, **model))


@torch.no_grad()
def binary_maps(scorer: RegionScorer, x: np.ndarray, mean, std, batch: int = 256, progress: bool = False) -> np.ndarray:
    """fp32 binary score maps (N, H', W', C) uint8 for uint8 HWC images."""
    scorer.eval()
    out = []
    for i in tqdm(range(0, len(x), batch), desc="maps", disable=not progress, leave=False):
        z = scorer(normalize(to_nchw(x[i:i + batch]), mean, std))
        out.append((z >= 0).permute(0, 2, 3, 1).to(torch.uint8).numpy())
    return np.concatenate(out)


def evaluate(maps: np.ndarray, y: np.ndarray, geometry: Geometry, threat: str, condition: str = "3.2") -> dict:
    """Clean and certified accuracy (certificates of the predicted class that equals the label)."""
    _, pred = certifier.predict(maps)
    correct = pred == y
    per_rect: dict[str, int] = {}
    cert_all = np.ones(len(y), dtype=bool)
    for i in range(0, len(y), 256):
        certs = certifier.certify(maps[i:i + 256], pred[i:i + 256], geometry, parse(threat), condition)
        for j, c in enumerate(certs):
            cert_all[i + j] = c.certified
            for k, r in c.per_rect.items():
                per_rect[k] = per_rect.get(k, 0) + int(r.certified and correct[i + j])
    n = len(y)
    return {"clean": float(correct.mean()), "certified": float((cert_all & correct).mean()),
            "per_rect": {k: v / n for k, v in per_rect.items()}, "n": n, "threat": threat, "condition": condition}


def _track_split(split: datasets.Split, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole GTSRB tracks (one physical sign each) so validation never sees a training track."""
    n = len(split.y)
    if split.name.startswith("gtsrb"):
        root = datasets.data_root(None)
        with np.load(root / "gtsrb" / "gtsrb32.npz", allow_pickle=False) as d:
            groups = split.y.astype(np.int64) * 100000 + d["train_track"].astype(np.int64)
    else:
        groups = np.arange(n)
    uniq = np.unique(groups)
    held = np.random.default_rng(seed).choice(uniq, size=max(1, int(frac * len(uniq))), replace=False)
    val = np.isin(groups, held)
    return np.flatnonzero(~val), np.flatnonzero(val)


def _train_epoch(model, opt, xs, ys, mean, std, cfg: TrainConfig, d: Dist, rng, step: int, total: int,
                 warmup: int, desc: str) -> tuple[int, float]:
    model.train()
    batches = epoch_batches(len(ys), cfg.batch_size, rng, d)
    bar = tqdm(batches, desc=desc, disable=not d.main, leave=False)
    losses = []
    for idx in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, warmup, cfg.lr)
        x = photometric(augment(xs[idx], rng, cfg.crop_pad, cfg.flips), rng, cfg.jitter)
        x = normalize(x, mean, std).to(d.device)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            z = model(x)
        loss = bagcert_loss(heaviside(z.float()), ys[idx].to(d.device), cfg.margin, cfg.sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    return step, float(np.mean(losses)) if losses else float("nan")


def train(cfg: TrainConfig, out: Path, data_dir: str | None = None, device: str = "auto",
          preset: str = "custom", command: str = "") -> dict:
    """Train a region scorer; writes ``out/model.safetensors`` (+ .json) and ``out/metrics.json``; returns metrics."""
    d = setup_distributed(device)
    commit = git_commit()  # the code that trains, not whatever HEAD is when training ends
    rng = seed_everything(cfg.seed)
    train_split = datasets.load(datasets.part_spec(cfg.dataset, "train"), data_dir, cfg.input_hw)
    test_split = datasets.load(datasets.part_spec(cfg.dataset, "test"), data_dir, cfg.input_hw)
    fit_idx, val_idx = _track_split(train_split, 0.05, cfg.seed)
    mean, std = datasets.channel_stats(train_split.x[fit_idx])
    xs, ys = to_nchw(train_split.x[fit_idx]), torch.from_numpy(train_split.y[fit_idx])
    scorer = build_scorer(len(train_split.classes), cfg.model).to(d.device).to(memory_format=torch.channels_last)
    model = DistributedDataParallel(scorer) if d.world > 1 else scorer
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = len(epoch_batches(len(ys), cfg.batch_size, rng, d))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    geometry = Geometry.from_dict(scorer.cfg.geometry(train_split.x.shape[1:3]))
    step, t0, history = 0, time.time(), []
    for epoch in range(cfg.epochs):
        step, loss = _train_epoch(model, opt, xs, ys, mean, std, cfg, d, rng, step, total, warmup,
                                  f"epoch {epoch + 1}/{cfg.epochs}")
        if d.main and (epoch % 5 == 4 or epoch == cfg.epochs - 1):
            val = evaluate(binary_maps(scorer, train_split.x[val_idx], mean, std), train_split.y[val_idx],
                           geometry, cfg.eval_threat)
            history.append({"epoch": epoch + 1, "loss": loss, "val_clean": val["clean"],
                            "val_certified": val["certified"], "minutes": (time.time() - t0) / 60})
            tqdm.write(json.dumps(history[-1]))
    metrics = {}
    if d.main:
        maps = binary_maps(scorer, test_split.x, mean, std, progress=True)
        metrics = {"test": evaluate(maps, test_split.y, geometry, cfg.eval_threat),
                   "test_condition_3.3": evaluate(maps, test_split.y, geometry, cfg.eval_threat, "3.3"),
                   "history": history, "train_minutes": (time.time() - t0) / 60}
        meta = {"defense": "bagcert", "preset": preset, "command": command, "config": cfg.to_dict(),
                "num_classes": len(train_split.classes),
                "classes": train_split.classes, "mean": mean, "std": std, "input_hw": list(train_split.x.shape[1:3]),
                "geometry": geometry.to_dict(), "dataset": {"train": train_split.name, "test": test_split.name,
                                                            "note": train_split.note, "validation": "5% of tracks"},
                "seed": cfg.seed, "commit": commit, "world_size": d.world, "metrics": metrics}
        save_checkpoint(scorer, meta, out / "model.safetensors")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    teardown_distributed()
    return metrics


def config_for(preset: str, **overrides) -> TrainConfig:
    return preset_config(PRESETS, preset, "BagCert", **overrides)


cli = typer.Typer(add_completion=False)


@cli.command("bagcert")
def train_command(
    preset: str = typer.Option("gtsrb-cpu", help=f"One of: {', '.join(PRESETS)}"),
    out: Path = typer.Option(..., help="Output folder for model.safetensors, its .json and metrics.json"),
    epochs: Optional[int] = typer.Option(None, help="Override the preset's epochs"),
    seed: Optional[int] = typer.Option(None, help="Override the preset's seed"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [default: torch's]"),
) -> None:
    """Train a BagCert region scorer (launch with torchrun for DistributedDataParallel)."""
    if threads:
        torch.set_num_threads(threads)
    command = command_line("bagcert", preset, out, epochs=epochs, seed=seed, threads=threads)
    metrics = train(config_for(preset, epochs=epochs, seed=seed), out, data_dir, device, preset, command)
    if metrics:
        typer.echo(json.dumps(metrics["test"]))
