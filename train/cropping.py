"""Randomized-cropping trainer: the crop classifier g, trained on one random crop per image per step (Algorithm 1).

The crop and its location go through ``certinfer.runtime.defenses.cropping.cut``, the function the runtime uses,
so training sees exactly the engine input the bundle will get. Validation holds out whole GTSRB tracks.
Metrics (torch, fp32): crop accuracy (one uniform crop per image), and on the first ``eval_images`` test images
the majority vote over ``eval_crops`` crops drawn with replacement: clean accuracy and the probabilistic
certificate (p_c >= 0.95) against ``eval_threat``. The exported bundle's runtime metrics are the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from certinfer.runtime.defenses import cropping
from certinfer.threat import parse
from certinfer.train.loop import augment, cosine_lr, normalize, photometric, to_nchw
from certinfer.train.models.cropping import build_cropnet
from certinfer.train.trainer import finish, run_epochs, start, steps_per_epoch, train_epoch, trainer_cli

DEFENSE = "cropping"

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
    background: bool = False  # add a "no sign" class (see certinfer.train.background)
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


PRESETS: dict[str, TrainConfig] = {
    # CPU presets, one thread each, at most about 30 minutes on one core here (epoch times in the README).
    "gtsrb-cpu": TrainConfig(jitter=0.4, epochs=30, background=True),
    # CIFAR-10 (our copy is JPEG-compressed), flips on.
    "cifar10-cpu": TrainConfig(dataset="cifar10", flips=True, epochs=30),
    # The paper's setting (Sec. 4): ResNet9 without final pooling on 10x10 CIFAR-10 crops, 30 epochs. A GPU job.
    "paper": TrainConfig(dataset="cifar10", flips=True, epochs=30, batch_size=512, lr=1e-3,
                         model=dict(_PAPER_NET)),
}


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
        x = normalize(to_nchw(x_uint8_hwc[i:i + batch]), mean, std).numpy()
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


@torch.no_grad()
def crop_accuracy(model, x: np.ndarray, y: np.ndarray, mean, std, crop_hw, device, seed: int) -> float:
    """Accuracy of the crop classifier on one uniform crop per image."""
    logits = crop_logits(model, x, mean, std, crop_hw, 1, np.random.default_rng(seed), device, batch=512)
    return float((logits[:, 0].argmax(-1) == y).mean())


def train(cfg: TrainConfig, out: Path, data_dir: str | None = None, device: str = "auto",
          preset: str = "custom", command: str = "", resume: bool = False) -> dict:
    """Train; writes ``out/model.safetensors`` (+ .json) and ``out/metrics.json``; returns the metrics.
    ``resume``: carry on from the resume state under ``out`` (see :mod:`certinfer.train.trainer`)."""
    run = start(DEFENSE, cfg, data_dir, device, preset, command, images=cfg.limit, test_images=cfg.eval_images,
                out=out, resume=resume)
    xs, ys = run.fit_tensors()
    net = build_cropnet(run.num_classes, cfg.model).to(run.device)
    model = DistributedDataParallel(net) if run.dist.world > 1 else net
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = steps_per_epoch(run, cfg.batch_size)
    total, warmup = cfg.epochs * per_epoch, int(cfg.warmup_epochs * per_epoch)

    def loss(idx: np.ndarray, _at: float) -> torch.Tensor:
        x = photometric(augment(xs[idx], run.rng, 0, cfg.flips), run.rng, cfg.jitter)
        crops = random_crops(normalize(x, run.mean, run.std).numpy(), cfg.crop_hw, run.rng)
        return F.cross_entropy(model(torch.from_numpy(crops).to(run.device)), ys[idx].to(run.device))

    def step(epoch: int) -> dict:
        return {"loss": train_epoch(run, epoch, model, [opt], lambda s: cosine_lr(s, total, warmup, cfg.lr), loss)}

    def validate() -> dict:
        return {"val_crop": crop_accuracy(net, run.train.x[run.val], run.train.y[run.val], run.mean, run.std,
                                          cfg.crop_hw, run.device, cfg.seed)}

    def test() -> dict:
        logits = crop_logits(net, run.test.x[run.tested], run.mean, run.std, cfg.crop_hw, cfg.eval_crops,
                             np.random.default_rng(cfg.seed + 3), run.device)
        return {"test": vote_metrics(logits, run.test.y[run.tested], cfg.input_hw, cfg.crop_hw, cfg.eval_threat),
                "note": (f"first {len(run.tested)} test images; crop: one crop per image; clean/certified: "
                         f"majority of {cfg.eval_crops} crops with replacement, p_c >= 0.95, ties as flips")}

    history = run_epochs(run, step, validate, cfg.eval_every, net=net, optimizers=[opt])
    return finish(run, net, out, history, test, crop_hw=list(cfg.crop_hw))


cli = trainer_cli(DEFENSE, train, PRESETS, "gtsrb-cpu",
                  "Train a randomized-cropping crop classifier (ResNet9-style, positional encoding at the first "
                  "layer).")
