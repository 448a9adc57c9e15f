"""PatchGuard (robust masking) trainer (Xiang et al. 2021): the two small-receptive-field models masking aggregates.

* ``bagnet``: a BagNet-style local-logits network (the BagCert region scorer with a BagNet kernel layout),
  trained with cross-entropy on the spatial mean of its local logits (N, C, H', W'), as BagNet is.
* ``drs``: the de-randomized smoothing base classifier (Levine & Feizi 2020) on (N, 4, H, W) image + keep
  mask, trained with cross-entropy on one random ablation (band or block of
  ``certinfer.runtime.ablation.masks``) per image per step.

Presets name the network: ``certinfer train masking --preset bagnet-gtsrb-cpu --out runs/...``. Validation
holds out whole GTSRB tracks. The checkpoint's metrics are measured in torch: clean accuracy of the plain
model (BagNet: argmax of the mean local logits; DRS: majority vote over every ablation, plus the base
classifier's accuracy per ablation and Levine & Feizi's vote-gap certificate). The exported bundle's runtime
metrics (robust masking, every variant) are the reference numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from certinfer.runtime import ablation
from certinfer.runtime.geometry import Geometry
from certinfer.threat import parse
from certinfer.train.loop import augment, cosine_lr, photometric, to_nchw
from certinfer.train.models.bagnet import bagnet_kernels, bagnet_loss, build_bagnet, masked_evidence_loss
from certinfer.train.models.drs import RESNET18, build_drs
from certinfer.train.trainer import Run, finish, run_epochs, start, steps_per_epoch, train_epoch, trainer_cli

DEFENSE = "masking"

NETWORKS = ("bagnet", "drs")

# RF 9 at output stride 2 on native 32x32 inputs: the three 3x3 kernels at full resolution (the third one
# strided), then 1x1 blocks at 16x16. A 5x5 patch touches at most ceil((5 + 9 - 1) / 2) = 7 x 7 of the
# 16 x 16 local logits (19%). Narrow first blocks keep a GTSRB epoch near 105 s on one core.
_CPU_STRIDES = (1, 1, 2, 1, 1, 1, 1, 1)
_CPU_BAGNET = dict(kernels=bagnet_kernels(9, _CPU_STRIDES), strides=_CPU_STRIDES,
                   widths=(32, 48) + (128,) * 6, stem_width=32)
# The paper's BagNet-17 geometry: output stride 8 (24 x 24 local logits at 192 x 192), RF 17.
_PAPER_STRIDES = (2, 1, 2, 1, 2, 1, 1, 1)
_COLUMNS_4 = {"mode": "column", "size": 4, "stride": 1}


@dataclass
class TrainConfig:
    network: str = "bagnet"  # "bagnet" (local logits) or "drs" (ablation base classifier)
    dataset: str = "gtsrb"
    model: dict = field(default_factory=lambda: dict(_CPU_BAGNET))
    epochs: int = 14
    batch_size: int = 128
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9, nesterov)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    crop_pad: int = 4
    flips: bool = False  # off for traffic signs: a mirrored "turn left" is "turn right"
    jitter: float = 0.0  # brightness/contrast jitter (GTSRB's lighting varies a lot)
    bf16: bool = True  # autocast in training and in the trainer's own evaluation; the exported graph is fp32
    seed: int = 0
    input_hw: tuple[int, int] = (32, 32)  # model input; a dataset with smaller images is upsampled per batch
    # F.interpolate mode for that upsampling: bilinear, as the runtime resizes frames (the paper used bicubic,
    # which a bundle could not reproduce at run time)
    upsample: str = "bilinear"
    ablation: dict = field(default_factory=lambda: dict(_COLUMNS_4))  # drs only
    eval_threat: str = "5x5"  # drs: the vote-gap certificate in the trainer's metrics; bagnet: mask_loss's window
    mask_loss: float = 0.0  # bagnet: weight of the robust-masking surrogate (models.bagnet.masked_evidence_loss)
    eval_every: int = 5
    limit: int = 0  # > 0: at most this many images per split (smoke tests)
    background: bool = False  # add a "no sign" class (see certinfer.train.background)

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"network {self.network!r}: choose from {NETWORKS}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r}: choose adam or sgd")
        self.input_hw = tuple(int(v) for v in self.input_hw)


PRESETS: dict[str, TrainConfig] = {
    # CPU presets train natively at 32x32 (no upsampling: it would multiply the cost by the scale factor
    # squared), each in about 30 minutes on one core here.
    # BagNet RF 9 / stride 2 on GTSRB, lighting jitter, no flips.
    "bagnet-gtsrb-cpu": TrainConfig(jitter=0.4, epochs=14),
    # The same network on CIFAR-10 (our copy is JPEG-compressed), flips on.
    "bagnet-cifar10-cpu": TrainConfig(dataset="cifar10", flips=True, epochs=10),
    # The same networks trained for robust masking as well (half the loss on the masking surrogate, see
    # models.bagnet.masked_evidence_loss): plain BagNet training concentrates a sign's evidence in one window.
    "bagnet-gtsrb-cpu-masked": TrainConfig(jitter=0.4, epochs=8, mask_loss=0.5),
    "bagnet-cifar10-cpu-masked": TrainConfig(dataset="cifar10", flips=True, epochs=6, mask_loss=0.5),
    # DRS base classifier, columns of 4 at stride 1 (35 bands on 32 columns), small ResNet (28 M MACs/image).
    "drs-gtsrb-cpu": TrainConfig(network="drs", model={}, jitter=0.4, epochs=30, background=True),
    "drs-cifar10-cpu": TrainConfig(network="drs", dataset="cifar10", model={}, flips=True, epochs=25),
    # The paper's Mask-BN model (Appendix A): CIFAR-10 upsampled to 192x192 (bilinear here), BagNet-17 geometry
    # (RF 17, output stride 8). From scratch (no ImageNet weights here), so Adam and 60 epochs. A GPU job.
    "bagnet-paper": TrainConfig(dataset="cifar10", flips=True, epochs=60, batch_size=64, bf16=False,
                                input_hw=(192, 192), weight_decay=5e-4, crop_pad=4,
                                model=dict(kernels=bagnet_kernels(17, _PAPER_STRIDES), strides=_PAPER_STRIDES,
                                           widths=(64, 64, 128, 128, 256, 256, 512, 512), stem_width=64)),
    # The paper's DS-4-ResNet-18 (Levine & Feizi 2020): columns of 4 on CIFAR-10, SGD. A GPU job.
    "drs-paper": TrainConfig(network="drs", dataset="cifar10", flips=True, epochs=200, optimizer="sgd", lr=0.1,
                             weight_decay=5e-4, warmup_epochs=0.0, bf16=False, model=dict(RESNET18)),
    # Receptive-field sweep (BagNet-9/17/33 at output stride 8, 192x192 CIFAR-10): GPU jobs.
    **{f"bagnet{rf}-cifar10": TrainConfig(dataset="cifar10", flips=True, epochs=60, batch_size=64, bf16=False,
                                          input_hw=(192, 192), weight_decay=5e-4,
                                          model=dict(kernels=bagnet_kernels(rf, _PAPER_STRIDES),
                                                     strides=_PAPER_STRIDES,
                                                     widths=(64, 64, 128, 128, 256, 256, 512, 512), stem_width=64))
       for rf in (9, 17, 33)},
}


def build(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    return (build_bagnet if cfg.network == "bagnet" else build_drs)(num_classes, cfg.model)


def ablation_geometry(cfg: TrainConfig) -> Geometry:
    a = cfg.ablation
    return ablation.geometry(cfg.input_hw, a["mode"], int(a["size"]), int(a.get("stride", 1)))


def model_geometry(cfg: TrainConfig, model: torch.nn.Module) -> Geometry:
    """Local-logits geometry (BagNet) or the ablation ensemble's (DRS), at the model input size."""
    if cfg.network == "bagnet":
        return Geometry.from_dict(model.cfg.geometry(cfg.input_hw))
    return ablation_geometry(cfg)


def to_input01(x_uint8: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 NCHW -> float [0, 1] at the model input size (upsampled with ``mode`` where smaller)."""
    x = x_uint8.float() / 255.0
    if tuple(x.shape[-2:]) != tuple(hw):
        x = F.interpolate(x, size=tuple(hw), mode=mode, align_corners=False).clamp_(0, 1)
    return x


def _norm(x01: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x01.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x01.device).view(1, -1, 1, 1)
    return (x01 - m) / s


def _drs_input(x01: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] and (N, H, W) keep masks -> the base classifier's (N, 4, H, W) input."""
    return torch.cat([x01, keep[:, None].to(x01.dtype)], dim=1)


@torch.no_grad()
def bagnet_mean_logits(model, x: np.ndarray, mean, std, cfg: TrainConfig, device, batch: int = 256) -> np.ndarray:
    """(N, C) spatial mean of the local logits for uint8 HWC images."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb = _norm(to_input01(to_nchw(x[i:i + batch]).to(device), cfg.input_hw, cfg.upsample), mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            z = model(xb.contiguous(memory_format=torch.channels_last))
        out.append(z.float().mean(dim=(2, 3)).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def drs_logits(model, x: np.ndarray, cfg: TrainConfig, device, batch: int = 32) -> np.ndarray:
    """(N, K, C) base-classifier logits of every ablation of every image (uint8 HWC)."""
    model.eval()
    keep = torch.from_numpy(np.array(ablation.masks(ablation_geometry(cfg)))).to(device)
    k = len(keep)
    out = []
    for i in range(0, len(x), batch):
        x01 = to_input01(to_nchw(x[i:i + batch]).to(device), cfg.input_hw, cfg.upsample)
        n = len(x01)
        inp = _drs_input(x01.repeat_interleave(k, 0), keep.repeat(n, 1, 1))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            z = model(inp.contiguous(memory_format=torch.channels_last))
        out.append(z.float().view(n, k, -1).cpu().numpy())
    return np.concatenate(out)


def max_affected(geometry: Geometry, threat: str) -> int:
    """The most output positions (bands or blocks) one patch of ``threat`` can touch, over rects and locations."""
    worst = 0
    for rect in parse(threat, input_hw=geometry.input_hw).rects:
        (r0, r1), (c0, c1) = geometry.affected_ranges(rect)
        worst = max(worst, int((r1 - r0).max()) * int((c1 - c0).max()))
    return worst


def drs_metrics(logits: np.ndarray, y: np.ndarray, geometry: Geometry, threat: str) -> dict:
    """Base accuracy per ablation, majority-vote accuracy and Levine & Feizi's certificate (gap > 2k, ties flip)."""
    n, k, c = logits.shape
    pred = logits.argmax(-1)  # (N, K)
    counts = np.zeros((n, c), np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), k), pred.ravel()), 1)
    vote = counts.argmax(1)
    rival = np.where(np.arange(c)[None] == vote[:, None], -1, counts).max(1)
    affected = max_affected(geometry, threat)
    gap = counts[np.arange(n), vote] - rival
    correct = vote == y
    return {"base": float((pred == y[:, None]).mean()), "clean": float(correct.mean()),
            "drs_certified": float((correct & (gap > 2 * affected)).mean()), "affected": affected,
            "threat": threat, "n": int(n)}


def evaluate(model, x: np.ndarray, y: np.ndarray, mean, std, cfg: TrainConfig, device) -> dict:
    if cfg.network == "bagnet":
        pred = bagnet_mean_logits(model, x, mean, std, cfg, device).argmax(1)
        return {"clean": float((pred == y).mean()), "n": int(len(y))}
    return drs_metrics(drs_logits(model, x, cfg, device), y, ablation_geometry(cfg), cfg.eval_threat)


def mask_window(geometry: Geometry, threat: str) -> tuple[int, int]:
    """The most feature rows and columns one patch of ``threat`` reaches (masked_evidence_loss's window)."""
    spans = [geometry.affected_ranges(r) for r in parse(threat, input_hw=geometry.input_hw).rects]
    return (max(int((r1 - r0).max()) for (r0, r1), _ in spans), max(int((c1 - c0).max()) for _, (c0, c1) in spans))


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                               weight_decay=cfg.weight_decay)
    if cfg.weight_decay:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def _loss(run: Run, model: torch.nn.Module, geometry: Geometry):
    """The mini-batch loss: BagNet (plain or with the masking surrogate) or DRS on one random ablation per image."""
    cfg = run.cfg
    xs, ys = run.fit_tensors()
    keep = torch.from_numpy(np.array(ablation.masks(ablation_geometry(cfg)))).to(run.device) \
        if cfg.network == "drs" else None
    window = mask_window(geometry, cfg.eval_threat) if cfg.network == "bagnet" else None

    def loss(idx: np.ndarray, _at: float) -> torch.Tensor:
        x = photometric(augment(xs[idx], run.rng, cfg.crop_pad, cfg.flips), run.rng, cfg.jitter)
        x01 = to_input01(x.to(run.device), cfg.input_hw, cfg.upsample)
        if keep is None:
            inp = _norm(x01, run.mean, run.std)
        else:  # one random band/block per image
            inp = _drs_input(x01, keep[torch.from_numpy(run.rng.integers(len(keep), size=len(idx))).to(run.device)])
        target = ys[idx].to(run.device)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            z = model(inp.contiguous(memory_format=torch.channels_last))
        if cfg.network == "drs":
            return F.cross_entropy(z.float(), target)
        return masked_evidence_loss(z, target, window, cfg.mask_loss) if cfg.mask_loss else bagnet_loss(z, target)

    return loss


def _dataset_meta(run: Run) -> dict:
    cfg, shape = run.cfg, tuple(run.train.x.shape[1:3])
    upsampled = (f"{shape[0]}x{shape[1]} -> {cfg.input_hw[0]}x{cfg.input_hw[1]} {cfg.upsample}"
                 if shape != cfg.input_hw else None)
    return {**run.dataset_meta(), "upsampled": upsampled}


def train(cfg: TrainConfig, out: Path, data_dir: str | None = None, device: str = "auto",
          preset: str = "custom", command: str = "", resume: bool = False) -> dict:
    """Train; writes ``out/model.safetensors`` (+ .json) and ``out/metrics.json``; returns the metrics.
    ``resume``: carry on from the resume state under ``out`` (see :mod:`certinfer.train.trainer`)."""
    run = start(DEFENSE, cfg, data_dir, device, preset, command, images=cfg.limit, out=out, resume=resume)
    if cfg.network == "drs":  # the base classifier takes [0, 1] pixels: its (x, 1 - x) encoding needs them unnormalized
        run.mean, run.std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    net = build(cfg, run.num_classes).to(run.device).to(memory_format=torch.channels_last)
    geometry = model_geometry(cfg, net)
    model = DistributedDataParallel(net) if run.dist.world > 1 else net
    opt = _optimizer(cfg, model)
    per_epoch = steps_per_epoch(run, cfg.batch_size)
    total, warmup = cfg.epochs * per_epoch, int(cfg.warmup_epochs * per_epoch)
    loss = _loss(run, model, geometry)

    def step(epoch: int) -> dict:
        return {"loss": train_epoch(run, epoch, model, [opt], lambda s: cosine_lr(s, total, warmup, cfg.lr), loss)}

    def validate() -> dict:
        val = evaluate(net, run.train.x[run.val], run.train.y[run.val], run.mean, run.std, cfg, run.device)
        return {f"val_{k}": v for k, v in val.items() if isinstance(v, float)}

    def test() -> dict:
        return {"test": evaluate(net, run.test.x[run.tested], run.test.y[run.tested], run.mean, run.std, cfg,
                                 run.device),
                "eval_precision": "bf16 autocast" if cfg.bf16 else "fp32",
                "note": ("clean: argmax of the mean local logits" if cfg.network == "bagnet" else
                         "base: base classifier accuracy over all ablations; clean: majority vote over all "
                         "ablations; drs_certified: vote gap > 2 x affected bands/blocks (ties as flips)")}

    history = run_epochs(run, step, validate, cfg.eval_every, net=net, optimizers=[opt])
    extra = {"ablation": dict(cfg.ablation)} if cfg.network == "drs" else {}
    return finish(run, net, out, history, test, network=cfg.network, geometry=geometry.to_dict(),
                  dataset=_dataset_meta(run), **extra)


cli = trainer_cli(DEFENSE, train, PRESETS, "bagnet-gtsrb-cpu",
                  "Train a robust-masking (PatchGuard) network: BagNet local logits or a DRS base classifier (the "
                  "preset says which).")
