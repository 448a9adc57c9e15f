"""ScaleCert trainer: a ResNet-style CNN trained dense, then fine-tuned with its SIN layer and random occlusions.

Phase 1 (``dense_epochs``): the plain network (no pruning). Phase 2: the SIN layer prunes all but the top-k
superficial positions, so only winners forward features and receive gradients (paper Sec. 3.2, winner-take-all
dropout), and each image is occluded with probability ``occlude`` by a window drawn from the runtime's own window
families (``runtime.defenses.scalecert.family``) for ``occlusion_threat``: training sees the masks certification
uses. Validation holds out whole GTSRB tracks. Metrics (torch, fp32, first ``eval_images`` test images): clean
accuracy and accuracy under a random family window; the exported bundle's runtime metrics are the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from certinfer.runtime.defenses.scalecert import DEFAULT_R, DEFAULT_TAU, family
from certinfer.threat import parse
from certinfer.train.loop import augment, cosine_lr, load_checkpoint, normalize, photometric, to_nchw
from certinfer.train.models.scalecert import build_scalecert
from certinfer.train.trainer import (EPOCHS, LIMIT, SEED, THREADS, Override, finish, run_epochs, start,
                                     steps_per_epoch, train_epoch, trainer_cli)

DEFENSE = "scalecert"

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
    background: bool = False  # add a "no sign" class (see certinfer.train.background)

    def __post_init__(self) -> None:
        self.input_hw = tuple(int(v) for v in self.input_hw)
        self.model = {**self.model, "input_hw": list(self.input_hw)}
        if not 0 <= self.dense_epochs <= self.epochs:
            raise ValueError(f"dense_epochs {self.dense_epochs} must lie in [0, epochs={self.epochs}]")


PRESETS: dict[str, TrainConfig] = {
    # SIN fine-tuning of a trained checkpoint (--init) against the worst of 4 windows per image, every image occluded.
    "gtsrb-cpu-finetune": TrainConfig(jitter=0.4, epochs=10, dense_epochs=0, lr=5e-4, warmup_epochs=0.2, occlude=1.0,
                                      worst_of=4, background=True),
    # CPU presets, one thread: about 25 minutes on one core here (times in the README).
    "gtsrb-cpu": TrainConfig(jitter=0.4, background=True),
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


def train(cfg: TrainConfig, out: Path, data_dir: str | None = None, device: str = "auto",
          preset: str = "custom", command: str = "", resume: bool = False) -> dict:
    """Train; writes ``out/model.safetensors`` (+ .json) and ``out/metrics.json``; returns the metrics.
    ``resume``: carry on from the resume state under ``out`` (see :mod:`certinfer.train.trainer`), in either
    phase (dense or SIN fine-tuning: the epoch decides)."""
    run = start(DEFENSE, cfg, data_dir, device, preset, command, images=cfg.limit, test_images=cfg.eval_images,
                out=out, resume=resume)
    xs, ys = run.fit_tensors()
    windows = torch.from_numpy(occlusion_masks(cfg.input_hw, cfg.occlusion_threat, cfg.r, cfg.tau))
    net = build_scalecert(run.num_classes, cfg.model)
    if cfg.init and run.previous is not None:  # resuming: the weights are in the resume state
        run.mean, run.std = run.previous["mean"], run.previous["std"]
    elif cfg.init:
        state, init_meta = load_checkpoint(Path(cfg.init))
        net.load_state_dict(state)
        run.mean, run.std = init_meta["mean"], init_meta["std"]  # the inputs the weights were trained on
    net = net.to(run.device)
    model = DistributedDataParallel(net) if run.dist.world > 1 else net
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = steps_per_epoch(run, cfg.batch_size)
    total, warmup = cfg.epochs * per_epoch, int(cfg.warmup_epochs * per_epoch)

    def loss(idx: np.ndarray, _at: float) -> torch.Tensor:
        x = normalize(photometric(augment(xs[idx], run.rng, cfg.crop_pad, cfg.flips), run.rng, cfg.jitter),
                      run.mean, run.std)
        y = ys[idx].to(run.device)
        occlude = cfg.occlude if net.sparse else 0.0
        masks = (worst_masks(net, x.to(run.device), y, windows, cfg.worst_of, occlude, run.rng)
                 if net.sparse and cfg.worst_of > 1 else random_masks(windows, len(idx), occlude, run.rng))
        logits, _ = model(engine_batch(x, masks).to(run.device))
        return F.cross_entropy(logits, y)

    def step(epoch: int) -> dict:
        net.sparse = epoch >= cfg.dense_epochs
        return {"sparse": net.sparse,
                "loss": train_epoch(run, epoch, model, [opt], lambda s: cosine_lr(s, total, warmup, cfg.lr), loss)}

    def validate() -> dict:
        return {"val": accuracy(net, run.train.x[run.val], run.train.y[run.val], run.mean, run.std, run.device)}

    def test() -> dict:
        net.sparse = True
        tx, ty = run.test.x[run.tested], run.test.y[run.tested]
        return {"test": {"clean": accuracy(net, tx, ty, run.mean, run.std, run.device),
                         "occluded": accuracy(net, tx, ty, run.mean, run.std, run.device, windows,
                                              seed=cfg.seed + 3),
                         "n": int(len(run.tested))},
                "note": (f"first {len(run.tested)} test images, sparse network; occluded: one random window of "
                         f"the {cfg.occlusion_threat} families (r={cfg.r}, tau={cfg.tau}) per image")}

    history = run_epochs(run, step, validate, cfg.eval_every, net=net, optimizers=[opt])
    return finish(run, net, out, history, test, geometry=net.cfg.geometry())


cli = trainer_cli(DEFENSE, train, PRESETS, "gtsrb-cpu",
                  "Train a ScaleCert network (ResNet-style, SIN layer after the stem, fine-tuned with random "
                  "occlusions).",
                  (EPOCHS, SEED, LIMIT, THREADS,
                   Override("init", str, "Start from this ScaleCert checkpoint (fine-tuning presets)"),
                   Override("dense_epochs", int, "Override the preset's dense warm-up epochs")))
