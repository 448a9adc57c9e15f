"""BagCert trainer: region scorer + Heaviside + margin loss (Sec. 3.3), Adam with warmup and cosine decay."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from certinfer.runtime.defenses import bagcert as certifier
from certinfer.runtime.geometry import Geometry
from certinfer.threat import parse
from certinfer.train.loop import augment, cosine_lr, normalize, photometric, to_nchw
from certinfer.train.losses import bagcert_loss
from certinfer.train.models.bagcert import RegionScorer, RegionScorerConfig, heaviside, rf_kernels
from certinfer.train.trainer import (EPOCHS, SEED, THREADS, Run, finish, run_epochs, start, steps_per_epoch,
                                     train_epoch, trainer_cli)

DEFENSE = "bagcert"

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
    background: bool = False  # add a "no sign" class (see certinfer.train.background)
    input_hw: tuple[int, int] = (32, 32)  # image-folder datasets are resized to this


PRESETS: dict[str, TrainConfig] = {
    # RF 5 at stride 2 (the first default): trains on one CPU core in about an hour.
    "gtsrb-cpu": TrainConfig(),
    # The same scorer with lighting jitter, 20 epochs.
    "gtsrb-cpu-jitter": TrainConfig(epochs=20, jitter=0.4),
    # The default bundle. RF 7 at stride 2: more context per cell, a 5x5 patch touches up to 6x6 cells
    # (14% of the votes); lighting jitter against overfitting to GTSRB's ~1,300 physical signs; a "no sign" class.
    "gtsrb-cpu-rf7": TrainConfig(epochs=20, jitter=0.4, background=True,
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


def _loss(cfg: TrainConfig, model, xs, ys, run: Run):
    def loss(idx: np.ndarray, _at: float) -> torch.Tensor:
        x = photometric(augment(xs[idx], run.rng, cfg.crop_pad, cfg.flips), run.rng, cfg.jitter)
        x = normalize(x, run.mean, run.std).to(run.device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            z = model(x)
        return bagcert_loss(heaviside(z.float()), ys[idx].to(run.device), cfg.margin, cfg.sigma)

    return loss


def train(cfg: TrainConfig, out: Path, data_dir: str | None = None, device: str = "auto",
          preset: str = "custom", command: str = "", resume: bool = False) -> dict:
    """Train a region scorer; writes ``out/model.safetensors`` (+ .json) and ``out/metrics.json``; returns metrics.
    ``resume``: carry on from the resume state under ``out`` (see :mod:`certinfer.train.trainer`)."""
    run = start(DEFENSE, cfg, data_dir, device, preset, command, out=out, resume=resume)
    xs, ys = run.fit_tensors()
    scorer = build_scorer(run.num_classes, cfg.model).to(run.device).to(memory_format=torch.channels_last)
    model = DistributedDataParallel(scorer) if run.dist.world > 1 else scorer
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    per_epoch = steps_per_epoch(run, cfg.batch_size)
    total, warmup = cfg.epochs * per_epoch, int(cfg.warmup_epochs * per_epoch)
    geometry = Geometry.from_dict(scorer.cfg.geometry(run.train.x.shape[1:3]))
    loss = _loss(cfg, model, xs, ys, run)

    def step(epoch: int) -> dict:
        return {"loss": train_epoch(run, epoch, model, [opt], lambda s: cosine_lr(s, total, warmup, cfg.lr), loss)}

    def validate() -> dict:
        val = evaluate(binary_maps(scorer, run.train.x[run.val], run.mean, run.std), run.train.y[run.val], geometry,
                       cfg.eval_threat)
        return {"val_clean": val["clean"], "val_certified": val["certified"]}

    def test() -> dict:
        maps = binary_maps(scorer, run.test.x, run.mean, run.std, progress=True)
        return {"test": evaluate(maps, run.test.y, geometry, cfg.eval_threat),
                "test_condition_3.3": evaluate(maps, run.test.y, geometry, cfg.eval_threat, "3.3")}

    history = run_epochs(run, step, validate, every=5, net=scorer, optimizers=[opt])
    return finish(run, scorer, out, history, test, geometry=geometry.to_dict())


cli = trainer_cli(DEFENSE, train, PRESETS, "gtsrb-cpu",
                  "Train a BagCert region scorer (launch with torchrun for DistributedDataParallel).",
                  (EPOCHS, SEED, THREADS))
