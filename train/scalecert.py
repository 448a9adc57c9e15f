"""ScaleCert trainer: a ResNet-style CNN trained dense, then fine-tuned with its SIN layer and random occlusions.

Phase 1 (``dense_epochs``): the plain network (no pruning). Phase 2: the SIN layer prunes all but the top-k
superficial positions, so only winners forward features and receive gradients (paper Sec. 3.2, winner-take-all
dropout), and each image is occluded with probability ``occlude`` by a window drawn from the runtime's own window
families (``runtime.defenses.scalecert.family``) for ``occlusion_threat``: training sees the masks certification
uses. Validation holds out whole GTSRB tracks. Metrics (torch, fp32, first ``eval_images`` test images): clean
accuracy and accuracy under a random family window; the exported bundle's runtime metrics are the reference.
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
from certinfer.runtime.defenses.scalecert import DEFAULT_R, DEFAULT_TAU, family
from certinfer.threat import parse
from certinfer.train import data as datasets
from certinfer.train.bagcert import _track_split
from certinfer.train.loop import (Dist, augment, command_line, cosine_lr, epoch_batches, load_checkpoint, normalize,
                                  photometric, preset_config, save_checkpoint, seed_everything, setup_distributed,
                                  teardown_distributed, to_nchw)
from certinfer.train.models.scalecert import build_scalecert

# About 15 M multiply-adds per 32x32 image: stem 32 + three stages (32, 64, 128) of one basic block, stride 2 each.
_CPU_NET = dict(stem=32, widths=(32, 64, 128), strides=(2, 2, 2), blocks=(1, 1, 1), top_k=0.2)
# ResNet-18 (CIFAR variant: 3x3 stem, stride 1), the paper's CIFAR-10 model, SIN after the stem.
_PAPER_NET = dict(stem=64, widths=(64, 128, 256, 512), strides=(1, 2, 2, 2), blocks=(2, 2, 2, 2), top_k=0.2)


@dataclass
class TrainConfig:
    dataset: str = "gtsrb"
    model: dict = field(default_factory=lambda: dict(_CPU_NET))
    epochs: int = 24
    dense_epochs: int = 6  # of ``epochs``: the dense warm-up before SIN fine-tuning
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4  # AdamW
    warmup_epochs: float = 1.0
    crop_pad: int = 2
    flips: bool = False  # off for traffic signs
    jitter: float = 0.0
    occlude: float = 0.5  # share of images occluded by a random family window during fine-tuning
    worst_of: int = 1  # > 1: try this many windows per image and train on the one with the highest loss
    init: str = ""  # a ScaleCert checkpoint to start from (fine-tuning; its weights only)
    occlusion_threat: str = "2.4%,0.4%"
    r: int = DEFAULT_R
    tau: float = DEFAULT_TAU
    seed: int = 0
    input_hw: tuple[int, int] = (32, 32)
    eval_images: int = 2000
    eval_every: int = 4
    limit: int = 0  # > 0: at most this many images per split (smoke tests)

    def __post_init__(self) -> None:
        self.input_hw = tuple(int(v) for v in self.input_hw)
        self.model = {**self.model, "input_hw": list(self.input_hw)}
        if not 0 <= self.dense_epochs <= self.epochs:
            raise ValueError(f"dense_epochs {self.dense_epochs} must lie in [0, epochs={self.epochs}]")

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, TrainConfig] = {
    # SIN fine-tuning of a trained checkpoint (--init) against the worst of 4 windows per image, every image occluded.
    "gtsrb-cpu-finetune": TrainConfig(jitter=0.4, epochs=10, dense_epochs=0, lr=5e-4, warmup_epochs=0.2, occlude=1.0,
                                      worst_of=4),
    # CPU presets, one thread: about 25 minutes on one core here (times in the README).
    "gtsrb-cpu": TrainConfig(jitter=0.4),
    # CIFAR-10 (our copy is JPEG-compressed), flips on.
    "cifar10-cpu": TrainConfig(dataset="cifar10", flips=True, epochs=20, dense_epochs=5),
    # The paper's setting: ResNet-18 on CIFAR-10, SIN after the first layer, top 20%. A GPU job.
    "paper": TrainConfig(dataset="cifar10", flips=True, crop_pad=4, epochs=200, dense_epochs=100, lr=1e-3,
                         batch_size=256, model=dict(_PAPER_NET)),
}


def occlusion_masks(input_hw: tuple[int, int], threat: str, r: int, tau: float) -> np.ndarray:
    """Every window of every rectangle's family, (F, H, W) float32: the masks certification occludes with."""
    rects = parse(threat, input_hw=tuple(input_hw)).rects
    return np.concatenate([family(tuple(input_hw), tuple(rc), r, tau).masks for rc in rects])


def engine_batch(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) normalized + (N, H, W) masks -> the engine input (N, C+1, H, W)."""
    return torch.cat([x, masks[:, None].to(x.dtype)], dim=1)


def random_masks(windows: torch.Tensor, n: int, p: float, rng: np.random.Generator) -> torch.Tensor:
    """(n, H, W): a random family window with probability p, else no occlusion."""
    pick = torch.from_numpy(rng.integers(0, len(windows), n))
    on = torch.from_numpy(rng.random(n) < p)
    return torch.where(on[:, None, None], windows[pick], torch.zeros_like(windows[0]))


@torch.no_grad()
def accuracy(net, x_uint8: np.ndarray, y: np.ndarray, mean, std, device, windows: torch.Tensor | None = None,
             seed: int = 0, batch: int = 256) -> float:
    """Top-1 accuracy of the (sparse) network, unoccluded or under one random family window per image."""
    net.eval()
    rng, correct = np.random.default_rng(seed), 0
    for i in range(0, len(y), batch):
        x = normalize(to_nchw(x_uint8[i:i + batch]), mean, std)
        m = (random_masks(windows, len(x), 1.0, rng) if windows is not None
             else torch.zeros((len(x), *x.shape[2:])))
        logits, _ = net(engine_batch(x, m).to(device))
        correct += int((logits.argmax(1).cpu().numpy() == y[i:i + batch]).sum())
    return correct / max(1, len(y))


@torch.no_grad()
def worst_masks(net, x: torch.Tensor, y: torch.Tensor, windows: torch.Tensor, tries: int, p: float,
                rng: np.random.Generator) -> torch.Tensor:
    """Per image, the one of ``tries`` random masks with the highest loss (eval mode: BN statistics untouched)."""
    net.eval()
    masks = torch.stack([random_masks(windows, len(x), p, rng) for _ in range(tries)])  # (tries, n, H, W)
    losses = torch.stack([F.cross_entropy(net(engine_batch(x, m).to(y.device))[0], y, reduction="none")
                          for m in masks])
    net.train()
    return masks[losses.argmax(0).cpu(), torch.arange(len(x))]


def _train_epoch(model, net, opt, xs, ys, mean, std, cfg: TrainConfig, d: Dist, rng, step: int, total: int,
                 warmup: int, windows: torch.Tensor, desc: str) -> tuple[int, float]:
    model.train()
    batches = epoch_batches(len(ys), cfg.batch_size, rng, d)
    bar = tqdm(batches, desc=desc, disable=not d.main, leave=False, mininterval=1 if sys.stderr.isatty() else 30)
    occlude = cfg.occlude if net.sparse else 0.0
    losses = []
    for idx in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, warmup, cfg.lr)
        x = normalize(photometric(augment(xs[idx], rng, cfg.crop_pad, cfg.flips), rng, cfg.jitter), mean, std)
        y = ys[idx].to(d.device)
        masks = (worst_masks(net, x.to(d.device), y, windows, cfg.worst_of, occlude, rng)
                 if net.sparse and cfg.worst_of > 1 else random_masks(windows, len(idx), occlude, rng))
        logits, _ = model(engine_batch(x, masks).to(d.device))
        loss = F.cross_entropy(logits, y)
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
    test_idx = _limit(np.arange(min(len(test_split.y), cfg.eval_images or len(test_split.y))), cfg.limit, cfg.seed + 2)
    mean, std = datasets.channel_stats(train_split.x[fit_idx])
    xs, ys = to_nchw(train_split.x[fit_idx]), torch.from_numpy(train_split.y[fit_idx])
    windows = torch.from_numpy(occlusion_masks(cfg.input_hw, cfg.occlusion_threat, cfg.r, cfg.tau))
    net = build_scalecert(len(train_split.classes), cfg.model)
    if cfg.init:
        state, init_meta = load_checkpoint(Path(cfg.init))
        net.load_state_dict(state)
        mean, std = init_meta["mean"], init_meta["std"]  # the inputs the weights were trained on
    net = net.to(d.device)
    model = DistributedDataParallel(net) if d.world > 1 else net
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(len(ys), cfg.batch_size, rng, d))
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    step, t0, history = 0, time.time(), []
    for epoch in range(cfg.epochs):
        net.sparse = epoch >= cfg.dense_epochs
        te = time.time()
        step, loss = _train_epoch(model, net, opt, xs, ys, mean, std, cfg, d, rng, step, total, warmup, windows,
                                  f"epoch {epoch + 1}/{cfg.epochs}{' (SIN)' if net.sparse else ' (dense)'}")
        row = {"epoch": epoch + 1, "sparse": net.sparse, "loss": loss, "epoch_seconds": time.time() - te}
        if d.main and (epoch % cfg.eval_every == cfg.eval_every - 1 or epoch == cfg.epochs - 1):
            row["val"] = accuracy(net, train_split.x[val_idx], train_split.y[val_idx], mean, std, d.device)
        row["minutes"] = (time.time() - t0) / 60
        history.append(row)
        if d.main:
            tqdm.write(json.dumps(row))
    metrics = {}
    if d.main:
        net.sparse = True
        tx, ty = test_split.x[test_idx], test_split.y[test_idx]
        test = {"clean": accuracy(net, tx, ty, mean, std, d.device),
                "occluded": accuracy(net, tx, ty, mean, std, d.device, windows, seed=cfg.seed + 3),
                "n": int(len(test_idx))}
        metrics = {"test": test, "history": history, "train_minutes": (time.time() - t0) / 60,
                   "note": (f"first {len(test_idx)} test images, sparse network; occluded: one random window of "
                            f"the {cfg.occlusion_threat} families (r={cfg.r}, tau={cfg.tau}) per image")}
        meta = {"defense": "scalecert", "preset": preset, "command": command, "config": cfg.to_dict(),
                "num_classes": len(train_split.classes), "classes": train_split.classes, "mean": mean, "std": std,
                "input_hw": list(cfg.input_hw), "geometry": net.cfg.geometry(),
                "dataset": {"train": train_split.name, "test": test_split.name, "note": train_split.note,
                            "validation": "5% of tracks" if train_split.name.startswith("gtsrb") else "5% of images"},
                "seed": cfg.seed, "commit": commit, "world_size": d.world, "metrics": metrics}
        save_checkpoint(net, meta, out / "model.safetensors")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    teardown_distributed()
    return metrics


def config_for(preset: str, **overrides) -> TrainConfig:
    return preset_config(PRESETS, preset, "scalecert", **overrides)


cli = typer.Typer(add_completion=False)


@cli.command("scalecert")
def train_command(
    preset: str = typer.Option("gtsrb-cpu", help=f"One of: {', '.join(PRESETS)}"),
    out: Path = typer.Option(..., help="Output folder for model.safetensors, its .json and metrics.json"),
    epochs: Optional[int] = typer.Option(None, help="Override the preset's epochs"),
    dense_epochs: Optional[int] = typer.Option(None, help="Override the preset's dense warm-up epochs"),
    seed: Optional[int] = typer.Option(None, help="Override the preset's seed"),
    init: Optional[str] = typer.Option(None, help="Start from this ScaleCert checkpoint (fine-tuning presets)"),
    limit: Optional[int] = typer.Option(None, help="At most this many images per split (smoke tests)"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [default: torch's]"),
) -> None:
    """Train a ScaleCert network (ResNet-style, SIN layer after the stem, fine-tuned with random occlusions)."""
    if threads:
        torch.set_num_threads(threads)
    command = command_line("scalecert", preset, out, epochs=epochs, seed=seed, limit=limit, threads=threads, init=init,
                           dense_epochs=dense_epochs)
    metrics = train(config_for(preset, epochs=epochs, dense_epochs=dense_epochs, seed=seed, limit=limit, init=init),
                    out, data_dir, device, preset, command)
    if metrics:
        typer.echo(json.dumps(metrics["test"]))
