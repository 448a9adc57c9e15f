"""Randomized-cropping trainer: the crop classifier g, trained on one random crop per image per step (Algorithm 1).

The crop and its location go through ``certinfer.runtime.defenses.cropping.cut``, the function the runtime uses,
so training sees exactly the engine input the bundle will get. Validation holds out whole GTSRB tracks.
Metrics (torch, fp32): crop accuracy (one uniform crop per image), and on the first ``eval_images`` test images
the majority vote over ``eval_crops`` crops drawn with replacement: clean accuracy and the probabilistic
certificate (p_c >= 0.95) against ``eval_threat``. The exported bundle's runtime metrics are the reference.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from certinfer.provenance import git_commit
from certinfer.runtime.defenses import cropping
from certinfer.threat import parse
from certinfer.train import data as datasets
from certinfer.train.bagcert import _track_split
from certinfer.train.loop import (Dist, augment, command_line, cosine_lr, epoch_batches, photometric, preset_config,
                                  save_checkpoint, seed_everything, setup_distributed, teardown_distributed, to_nchw)
from certinfer.train.models.cropnet import build_cropnet

# ResNet9 at half the paper's widths: about 8 M multiply-adds per 10x10 crop (the paper's: 32 M).
_CPU_NET = dict(widths=(32, 64, 128, 256), crop_hw=(10, 10))
_PAPER_NET = dict(widths=(64, 128, 256, 512), crop_hw=(10, 10))


@dataclass
class TrainConfig:
    dataset: str = "gtsrb"
    model: dict = field(default_factory=lambda: dict(_CPU_NET))
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4  # AdamW
    warmup_epochs: float = 1.0
    flips: bool = False  # off for traffic signs: a mirrored "turn left" is "turn right"
    jitter: float = 0.0  # brightness/contrast jitter
    seed: int = 0
    input_hw: tuple[int, int] = (32, 32)
    eval_crops: int = 128
    eval_threat: str = "2.4%"
    eval_images: int = 1000  # test images for the trainer's vote metrics (the bundle's certify is the reference)
    eval_every: int = 5
    limit: int = 0  # > 0: at most this many images per split (smoke tests)

    def __post_init__(self) -> None:
        self.input_hw = tuple(int(v) for v in self.input_hw)
        self.model = {**self.model, "input_hw": list(self.input_hw)}

    @property
    def crop_hw(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.model.get("crop_hw", (10, 10)))

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, TrainConfig] = {
    # CPU presets, one thread each, at most about 30 minutes on one core here (epoch times in the README).
    "gtsrb-cpu": TrainConfig(jitter=0.4, epochs=30),
    # CIFAR-10 (our copy is JPEG-compressed), flips on.
    "cifar10-cpu": TrainConfig(dataset="cifar10", flips=True, epochs=30),
    # The paper's setting (Sec. 4): ResNet9 without final pooling on 10x10 CIFAR-10 crops, 30 epochs. A GPU job.
    "paper": TrainConfig(dataset="cifar10", flips=True, epochs=30, batch_size=512, lr=1e-3,
                         model=dict(_PAPER_NET)),
}


def normalized(x_uint8: np.ndarray | torch.Tensor, mean, std) -> np.ndarray:
    """uint8 NCHW -> float32 NCHW normalized as the runtime prepares frames."""
    x = x_uint8.numpy() if isinstance(x_uint8, torch.Tensor) else x_uint8
    m, s = np.float32(mean).reshape(1, -1, 1, 1), np.float32(std).reshape(1, -1, 1, 1)
    return ((x.astype(np.float32) / 255.0 - m) / s).astype(np.float32)


def random_crops(x: np.ndarray, crop_hw: tuple[int, int], rng: np.random.Generator, per_image: int = 1) -> np.ndarray:
    """(N, 3, H, W) normalized -> (N * per_image, 5, ch, cw) engine inputs at uniform crop locations."""
    total = cropping.crop_locations(x.shape[2:], crop_hw)
    return cropping.cut(x, crop_hw, cropping.draw_locations(rng, len(x), per_image, total, replace=True))


@torch.no_grad()
def crop_logits(model, x_uint8_hwc: np.ndarray, mean, std, crop_hw, crops: int, rng, device,
                batch: int = 64) -> np.ndarray:
    """(N, crops, C) logits of ``crops`` uniform crops (with replacement) of every image."""
    model.eval()
    out = []
    for i in range(0, len(x_uint8_hwc), batch):
        x = normalized(x_uint8_hwc[i:i + batch].transpose(0, 3, 1, 2), mean, std)
        z = model(torch.from_numpy(random_crops(x, crop_hw, rng, crops)).to(device))
        out.append(z.float().view(len(x), crops, -1).cpu().numpy())
    return np.concatenate(out)


def vote_metrics(logits: np.ndarray, y: np.ndarray, input_hw, crop_hw, threat: str) -> dict:
    """Crop accuracy, majority-vote accuracy and probabilistic certified accuracy (p_c >= 0.95, replacement)."""
    pred = logits.argmax(-1)
    votes = cropping.count_votes(pred, logits.shape[-1])
    label = votes.argmax(1)
    certs = cropping.vote_certificates(votes, tuple(input_hw), tuple(crop_hw), parse(threat, input_hw=tuple(input_hw)))
    correct = label == y
    return {"crop": float((pred == y[:, None]).mean()), "clean": float(correct.mean()),
            "certified": float(np.mean([c.certified and ok for c, ok in zip(certs, correct)])),
            "crops": int(logits.shape[1]), "threat": threat, "n": int(len(y))}


def _train_epoch(model, opt, xs, ys, mean, std, cfg: TrainConfig, d: Dist, rng, step: int, total: int,
                 warmup: int, desc: str) -> tuple[int, float]:
    model.train()
    batches = epoch_batches(len(ys), cfg.batch_size, rng, d)
    bar = tqdm(batches, desc=desc, disable=not d.main, leave=False, mininterval=1 if sys.stderr.isatty() else 30)
    losses = []
    for idx in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, warmup, cfg.lr)
        x = photometric(augment(xs[idx], rng, 0, cfg.flips), rng, cfg.jitter)
        inp = torch.from_numpy(random_crops(normalized(x, mean, std), cfg.crop_hw, rng)).to(d.device)
        loss = F.cross_entropy(model(inp), ys[idx].to(d.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
    return step, float(np.mean(losses)) if losses else float("nan")


def _limit(idx: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if not limit or len(idx) <= limit:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))


@torch.no_grad()
def crop_accuracy(model, x: np.ndarray, y: np.ndarray, mean, std, crop_hw, device, seed: int) -> float:
    """Accuracy of the crop classifier on one uniform crop per image."""
    logits = crop_logits(model, x, mean, std, crop_hw, 1, np.random.default_rng(seed), device, batch=512)
    return float((logits[:, 0].argmax(-1) == y).mean())


def train(cfg: TrainConfig, out: Path, data_dir: str | None = None, device: str = "auto",
          preset: str = "custom", command: str = "") -> dict:
    """Train; writes ``out/model.safetensors`` (+ .json) and ``out/metrics.json``; returns the metrics."""
    d = setup_distributed(device)
    commit = git_commit()
    rng = seed_everything(cfg.seed)
    train_split = datasets.load(datasets.part_spec(cfg.dataset, "train"), data_dir, cfg.input_hw)
    test_split = datasets.load(datasets.part_spec(cfg.dataset, "test"), data_dir, cfg.input_hw)
    fit_idx, val_idx = _track_split(train_split, 0.05, cfg.seed)
    fit_idx, val_idx = _limit(fit_idx, cfg.limit, cfg.seed), _limit(val_idx, cfg.limit, cfg.seed + 1)
    test_idx = np.arange(min(len(test_split.y), cfg.eval_images or len(test_split.y)))
    test_idx = _limit(test_idx, cfg.limit, cfg.seed + 2)
    mean, std = datasets.channel_stats(train_split.x[fit_idx])
    xs, ys = to_nchw(train_split.x[fit_idx]), torch.from_numpy(train_split.y[fit_idx])
    net = build_cropnet(len(train_split.classes), cfg.model).to(d.device)
    model = DistributedDataParallel(net) if d.world > 1 else net
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(len(ys), cfg.batch_size, rng, d))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    step, t0, history = 0, time.time(), []
    for epoch in range(cfg.epochs):
        te = time.time()
        step, loss = _train_epoch(model, opt, xs, ys, mean, std, cfg, d, rng, step, total, warmup,
                                  f"epoch {epoch + 1}/{cfg.epochs}")
        row = {"epoch": epoch + 1, "loss": loss, "epoch_seconds": time.time() - te}
        if d.main and (epoch % cfg.eval_every == cfg.eval_every - 1 or epoch == cfg.epochs - 1):
            row["val_crop"] = crop_accuracy(net, train_split.x[val_idx], train_split.y[val_idx], mean, std,
                                            cfg.crop_hw, d.device, cfg.seed)
        row["minutes"] = (time.time() - t0) / 60
        history.append(row)
        if d.main:
            tqdm.write(json.dumps(row))
    metrics = {}
    if d.main:
        logits = crop_logits(net, test_split.x[test_idx], mean, std, cfg.crop_hw, cfg.eval_crops,
                             np.random.default_rng(cfg.seed + 3), d.device)
        test = vote_metrics(logits, test_split.y[test_idx], cfg.input_hw, cfg.crop_hw, cfg.eval_threat)
        metrics = {"test": test, "history": history, "train_minutes": (time.time() - t0) / 60,
                   "note": (f"first {len(test_idx)} test images; crop: one crop per image; clean/certified: "
                            f"majority of {cfg.eval_crops} crops with replacement, p_c >= 0.95, ties as flips")}
        meta = {"defense": "cropping", "preset": preset, "command": command, "config": cfg.to_dict(),
                "num_classes": len(train_split.classes), "classes": train_split.classes, "mean": mean, "std": std,
                "input_hw": list(cfg.input_hw), "crop_hw": list(cfg.crop_hw),
                "dataset": {"train": train_split.name, "test": test_split.name, "note": train_split.note,
                            "validation": "5% of tracks" if train_split.name.startswith("gtsrb") else "5% of images"},
                "seed": cfg.seed, "commit": commit, "world_size": d.world, "metrics": metrics}
        save_checkpoint(net, meta, out / "model.safetensors")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    teardown_distributed()
    return metrics


def config_for(preset: str, **overrides) -> TrainConfig:
    return preset_config(PRESETS, preset, "cropping", **overrides)


cli = typer.Typer(add_completion=False)


@cli.command("cropping")
def train_command(
    preset: str = typer.Option("gtsrb-cpu", help=f"One of: {', '.join(PRESETS)}"),
    out: Path = typer.Option(..., help="Output folder for model.safetensors, its .json and metrics.json"),
    epochs: Optional[int] = typer.Option(None, help="Override the preset's epochs"),
    seed: Optional[int] = typer.Option(None, help="Override the preset's seed"),
    limit: Optional[int] = typer.Option(None, help="At most this many images per split (smoke tests)"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [default: torch's]"),
) -> None:
    """Train a randomized-cropping crop classifier (ResNet9-style, positional encoding at the first layer)."""
    if threads:
        torch.set_num_threads(threads)
    command = command_line("cropping", preset, out, epochs=epochs, seed=seed, limit=limit, threads=threads)
    metrics = train(config_for(preset, epochs=epochs, seed=seed, limit=limit), out, data_dir, device, preset,
                    command)
    if metrics:
        typer.echo(json.dumps(metrics["test"]))
