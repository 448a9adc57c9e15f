"""Double-masking trainer: a small ResNet trained under masks from the certifier's own mask set.

PatchCleanser (Xiang et al. 2022) trains with masks as augmentation; greedy cutout (Saha et al., TMLR 2023)
trains on the worst masks. Here, on most of each batch, every image gets one or two masks drawn from the bundle's
mask set (``mask_set(input_hw, threat, stride)``); with ``worst_of > 1`` each two-mask image gets that many
random mask pairs, scored by the model without gradients, and trains on the one with the highest loss. Masked
pixels take ``mask_value`` in the normalized input, exactly as the runtime masks them.

Feature-space masking (PatchCURE, Xiang et al. 2024): with ``feature_splits`` a share ``feature_prob`` of the
batches is masked after the network's first ``split`` units instead, zeroing every feature cell whose receptive
field meets the pixel mask, so the back part learns what the runtime will show it.

Distillation (``--teacher``): a trained pixel-space model of the same mask set sees the same images under the
same masks, and ``distill_weight`` of the loss is the KL divergence from its softened prediction.

Training runs in resumable pieces, as every trainer's does (:mod:`certinfer.train.trainer`): every epoch writes
``last.safetensors`` (+ .json: epoch, step, history), ``optimizer.safetensors`` and ``rng.json`` under ``--out``;
``--resume`` carries on from there (same preset, options and ``--limit``; ``--epochs`` may be raised). The finished
model is ``model.safetensors`` (+ .json), what ``certinfer export doublemask`` reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer
from tqdm import tqdm

from certinfer.runtime.defenses.doublemask import mask_set
from certinfer.train import trainer
from certinfer.train.loop import (augment, command_line, cosine_lr, epoch_batches, load_checkpoint, normalize,
                                  photometric, preset_config, save_checkpoint, to_nchw)
from certinfer.train.models.doublemask import Classifier, classifier, geometry

DEFENSE = "doublemask"
MONITORED = 500  # validation images checked after every epoch (two-mask pairs on the first 100)

# Five units: RF 5 at 16x16 after the second (split points 2 and 3), then two strided basic blocks.
_CPU_UNITS = ("c3:32:1", "c3:64:2", "r1:128", "r3:128:2", "r3:192:2")
# A 4x4 patch embedding and three 1x1 bottlenecks (the front, split 4), then a light back.
_PATCH4_UNITS = ("p4:48", "r1:192", "r1:192", "r1:192", "c3:96:2", "r3:96")


@dataclass
class TrainConfig:
    dataset: str = "gtsrb"
    model: dict = field(default_factory=lambda: {"units": list(_CPU_UNITS), "dropout": 0.0})
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    crop_pad: int = 3
    flips: bool = False  # off for traffic signs: a mirrored "turn left" is "turn right"
    jitter: float = 0.3
    threat: str = "5x5"  # the patch the mask set covers
    stride: int = 5  # mask stride: masks of patch + stride - 1 pixels
    mask_value: float = 0.0  # in the normalized input (0 = the training set's mean colour)
    mask_prob: float = 0.9  # share of each batch that is masked
    two_mask_share: float = 0.67  # of the masked images, the share with two masks (the rest get one)
    worst_of: int = 4  # greedy cutout: candidate mask pairs per two-mask image (1 = random pairs)
    feature_splits: tuple[int, ...] = (2, 3)  # split points for feature-space masking (empty: pixels only)
    feature_prob: float = 0.3  # share of batches masked in feature space
    bf16: bool = True  # CPU/GPU autocast; the exported graph is fp32
    background: bool = False  # add a "no sign" class (see certinfer.train.background)
    seed: int = 0
    input_hw: tuple[int, int] = (32, 32)
    init: str = ""  # a double-masking checkpoint to start from (fine-tuning; its weights only)
    teacher: str = ""  # a pixel-space double-masking checkpoint to distil from, under the same masks
    distill_weight: float = 0.7  # share of the loss that matches the teacher (the rest: the labels)
    distill_temp: float = 2.0  # softmax temperature of the distillation loss

    def to_dict(self) -> dict:
        return asdict(self)


# 20 epochs: about 50 minutes of training on one shared CPU core (bf16 autocast; resumable).
_GTSRB_CPU = TrainConfig(background=True)
# Feature space without mask growth (the shipped feature bundle): a 4x4 patch embedding and a per-patch MLP
# (RF 4 at stride 4: an 8x8 map) run once per frame; 8x8 masks at stride 4 hide exactly 2x2 cells; the back
# (a strided 3x3 unit and a basic block, 3.3 M multiply-adds) runs per masked copy. Split 4 at export.
_GTSRB_CPU_PATCH4 = TrainConfig(background=True, epochs=30, stride=4, feature_splits=(4,), feature_prob=1.0,
                                model={"units": list(_PATCH4_UNITS), "dropout": 0.0})
# Fine-tuning a trained checkpoint of the same preset (--init): a lower, short cosine schedule.
_FINETUNE = {"epochs": 10, "lr": 5e-4, "warmup_epochs": 0.2}

PRESETS: dict[str, TrainConfig] = {
    "gtsrb-cpu": _GTSRB_CPU,
    # Fine-tuning a trained stride-4 gtsrb-cpu checkpoint.
    "gtsrb-cpu-finetune": replace(_GTSRB_CPU, stride=4, **_FINETUNE),
    # CIFAR-10 (our copy is JPEG-compressed): flips on, wider last block.
    "cifar10-cpu": TrainConfig(dataset="cifar10", epochs=30, flips=True, crop_pad=4, jitter=0.2,
                               model={"units": ["c3:32:1", "c3:64:2", "r1:128", "r3:128:2", "r3:128:1", "r3:256:2"],
                                      "dropout": 0.1}),
    # Built for feature space (PatchCURE): RF 5 at 16x16 after five units that hold 92% of the multiply-adds,
    # then a light back (a strided 3x3 unit and one basic block), masked on features only; split 5 at export.
    "gtsrb-cpu-feature": TrainConfig(background=True, epochs=16, feature_splits=(5,), feature_prob=1.0,
                                     model={"units": ["c3:48:1", "c3:96:2", "r1:128", "r1:128", "r1:128",
                                                      "c3:32:2", "r3:64:2"], "dropout": 0.0}),
    "gtsrb-cpu-patch4b": _GTSRB_CPU_PATCH4,
    "gtsrb-cpu-patch4b-finetune": replace(_GTSRB_CPU_PATCH4, **_FINETUNE),
    # A GPU run in the paper's spirit: wider, longer, greedy over 8 candidate pairs.
    "paper": TrainConfig(dataset="cifar10", epochs=200, batch_size=256, lr=3e-3, flips=True, crop_pad=4, jitter=0.2,
                         worst_of=8, bf16=False,
                         model={"units": ["c3:64:1", "c3:128:2", "r1:256", "r3:256:1", "r3:256:2", "r3:256:1",
                                          "r3:512:2", "r3:512:1"], "dropout": 0.1}),
}


def config_for(preset: str, **overrides) -> TrainConfig:
    return preset_config(PRESETS, preset, "double-masking", **overrides)


def feature_masks(masks: torch.Tensor, geo: dict) -> torch.Tensor:
    """Pixel masks (K, H, W) -> feature-cell masks (K, H', W'): a cell is masked when its receptive field
    (``geo``: rf, stride, padding, output_hw) meets a masked pixel."""
    rf, s, p = geo["rf"][0], geo["stride"][0], geo["padding"][0]
    m = masks.float()[:, None]
    out = F.max_pool2d(F.pad(m, (p, p + rf, p, p + rf)), rf, s)[:, 0] > 0
    return out[:, :geo["output_hw"][0], :geo["output_hw"][1]]


def masked_forward(model: Classifier, x: torch.Tensor, masks: torch.Tensor, split: int, geo: dict | None,
                   value: float, repeat: int = 1) -> torch.Tensor:
    """Logits of ``x`` (N, 3, H, W), each image repeated ``repeat`` times in a row, under one mask per row
    (N * repeat, H, W): in pixels (``geo`` None) or on the features after ``split`` units (cells meeting the mask
    set to 0; the front runs once per image)."""
    if geo is None:
        x = x.repeat_interleave(repeat, 0) if repeat > 1 else x
        return model(torch.where(masks[:, None], torch.as_tensor(value, dtype=x.dtype), x))
    f = model.front(x, split)
    f = f.repeat_interleave(repeat, 0) if repeat > 1 else f
    fm = feature_masks(masks, geo).to(f.device)
    return model.back(f.masked_fill(fm[:, None], 0.0), split)


def _draw_masks(n: int, k: int, two: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mask index pairs (n, 2); one-mask images repeat their mask."""
    i = rng.integers(0, k, size=n)
    j = np.where(two, rng.integers(0, k, size=n), i)
    return np.stack([i, j], axis=1)


@torch.no_grad()
def _worst_pairs(model: Classifier, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, candidates: np.ndarray,
                 split: int, geo: dict | None, cfg: TrainConfig) -> np.ndarray:
    """Greedy cutout: of ``candidates`` (n, m, 2) mask pairs per image, the one with the highest loss (n, 2)."""
    n, m, _ = candidates.shape
    was_training = model.training
    model.eval()
    pairs = torch.from_numpy(candidates.reshape(-1, 2))
    union = masks[pairs[:, 0]] | masks[pairs[:, 1]]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        z = masked_forward(model, x, union.to(x.device), split, geo, cfg.mask_value, repeat=m)
    loss = F.cross_entropy(z.float(), y.repeat_interleave(m, 0), reduction="none").view(n, m)
    model.train(was_training)
    best = loss.argmax(dim=1).cpu().numpy()
    return candidates[np.arange(n), best]


def _batch_masks(model, x, y, masks, split, geo, cfg: TrainConfig, rng) -> torch.Tensor:
    """Per-image masks (N, H, W) for one batch: none, one, or two (the worst of ``worst_of`` pairs)."""
    n, k = len(y), len(masks)
    masked = rng.random(n) < cfg.mask_prob
    two = masked & (rng.random(n) < cfg.two_mask_share)
    pairs = _draw_masks(n, k, two, rng)
    if cfg.worst_of > 1 and two.any():
        idx = np.flatnonzero(two)
        cand = rng.integers(0, k, size=(len(idx), cfg.worst_of, 2))
        pairs[idx] = _worst_pairs(model, x[idx], y[idx], masks, cand, split, geo, cfg)
    p = torch.from_numpy(pairs)
    out = masks[p[:, 0]] | masks[p[:, 1]]
    return out & torch.from_numpy(masked)[:, None, None]


def _all_right(model: Classifier, x: torch.Tensor, y: torch.Tensor, union: torch.Tensor, cfg: TrainConfig,
               space: tuple[int, dict | None], chunk: int = 2048) -> torch.Tensor:
    """(N, M) bool: the prediction under each of the ``union`` masks (M, H, W) equals the label; ``space``: the
    split and geometry of :func:`masked_forward`."""
    out = []
    for i in range(len(x)):
        for j in range(0, len(union), chunk):
            m = union[j:j + chunk]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                z = masked_forward(model, x[i:i + 1], m, *space, cfg.mask_value, repeat=len(m))
            out.append(z.argmax(1) == y[i])
    return torch.cat(out).view(len(x), len(union))


def monitor_space(model: Classifier, cfg: TrainConfig, hw: tuple[int, int]) -> tuple[int, dict | None]:
    """(split, geometry) for :func:`masked_forward`: pixels, unless every batch is masked on features."""
    if cfg.feature_splits and cfg.feature_prob >= 1:
        split = max(cfg.feature_splits)
        return split, geometry(model.unit_specs, split, hw)
    return len(model.units), None


@torch.no_grad()
def monitor(model: Classifier, x: np.ndarray, y: np.ndarray, mean, std, masks: torch.Tensor, cfg: TrainConfig,
            pair_images: int) -> dict:
    """Quick bf16 check on held-out images: clean accuracy, every one-mask prediction right (the certification
    ceiling) and, on the first ``pair_images``, every two-mask prediction right (certified, up to bf16 rounding).
    Masks go where the model is meant to run: in pixels, or on the features of the deepest split for a model
    trained in feature space only."""
    model.eval()
    space = monitor_space(model, cfg, tuple(x.shape[1:3]))
    xb, yb = normalize(to_nchw(x), mean, std), torch.from_numpy(y)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        clean = torch.cat([model(xb[i:i + 256]).argmax(1) for i in range(0, len(xb), 256)]) == yb
    one = _all_right(model, xb, yb, masks, cfg, space).all(1) & clean
    out = {"images": int(len(y)), "clean": float(clean.float().mean()), "one_mask": float(one.float().mean())}
    if pair_images:
        ii, jj = np.triu_indices(len(masks))
        union = masks[torch.from_numpy(ii)] | masks[torch.from_numpy(jj)]
        n = min(pair_images, len(y))
        cert = _all_right(model, xb[:n], yb[:n], union, cfg, space).all(1) & clean[:n]
        out |= {"certified": float(cert.float().mean()), "certified_images": n}
    model.train()
    return out


def _step(model: Classifier, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor,
          geos: dict[int, dict], cfg: TrainConfig, rng: np.random.Generator, teacher: Classifier | None) -> float:
    """One optimizer step on a normalized batch, masked in pixels or (a ``feature_prob`` share) on features."""
    use_feature = bool(cfg.feature_splits) and rng.random() < cfg.feature_prob
    split = int(rng.choice(cfg.feature_splits)) if use_feature else len(model.units)
    geo = geos[split] if use_feature else None
    m = _batch_masks(model, x, y, masks, split, geo, cfg, rng).to(x.device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        z = masked_forward(model, x, m, split, geo, cfg.mask_value)
    loss = F.cross_entropy(z.float(), y, label_smoothing=cfg.label_smoothing)
    if teacher is not None:
        loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * _distill_loss(teacher, x, m, z, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _distill_loss(teacher: Classifier, x: torch.Tensor, m: torch.Tensor, z: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """KL divergence from the teacher's softened prediction on the same images under the same masks, in pixels
    (with a patch-embedding front the student's feature masks hide exactly these pixels)."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        zt = masked_forward(teacher, x, m, len(teacher.units), None, cfg.mask_value)
    t = cfg.distill_temp
    return F.kl_div(F.log_softmax(z.float() / t, 1), F.log_softmax(zt.float() / t, 1), log_target=True,
                    reduction="batchmean") * t * t


def load_teacher(path: Path, cfg: TrainConfig, mean: list, std: list, device: str) -> Classifier:
    """A trained pixel-space double-masking classifier for distillation: same mask set, classes and inputs."""
    state, meta = load_checkpoint(path)
    tc = meta["config"]
    if (tc["threat"], tc["stride"], tc["mask_value"]) != (cfg.threat, cfg.stride, cfg.mask_value):
        raise ValueError(f"--teacher {path}: trained for masks of {tc['threat']} at stride {tc['stride']} "
                         f"(value {tc['mask_value']}), not {cfg.threat} at stride {cfg.stride} ({cfg.mask_value})")
    if meta["mean"] != list(mean) or meta["std"] != list(std) or tc["background"] != cfg.background:
        raise ValueError(f"--teacher {path}: trained on other inputs or classes than this run")
    teacher = classifier(meta["num_classes"], tc["model"])
    teacher.load_state_dict(state)
    return teacher.to(device).eval().requires_grad_(False)


def _epoch(run: trainer.Run, model: Classifier, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, torch.Tensor],
           masks: torch.Tensor, geos: dict[int, dict], meta: dict, schedule: tuple[int, int],
           teacher: Classifier | None) -> float:
    """One epoch over the fit images; ``meta["step"]`` counts optimizer steps (the learning-rate schedule's
    position, ``schedule`` = (total, warmup) steps); returns the mean loss."""
    cfg, rng, (xs, ys) = run.cfg, run.rng, data
    model.train()
    losses = []
    bar = tqdm(epoch_batches(len(ys), cfg.batch_size, rng, run.dist), desc=f"epoch {meta['epoch'] + 1}/{cfg.epochs}",
               mininterval=10)
    for idx in bar:
        for g in opt.param_groups:
            g["lr"] = cosine_lr(meta["step"], *schedule, cfg.lr)
        x = photometric(augment(xs[idx], rng, cfg.crop_pad, cfg.flips), rng, cfg.jitter)
        x = normalize(x, run.mean, run.std).to(run.device)
        losses.append(_step(model, opt, x, ys[idx].to(run.device), masks, geos, cfg, rng, teacher))
        meta["step"] += 1
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
    return float(np.mean(losses))


def start_from(model: Classifier, path: Path, cfg: TrainConfig) -> dict:
    """Load a checkpoint's weights into ``model`` for fine-tuning; returns its record (``mean`` and ``std``: the
    inputs the weights were trained on, kept so the fine-tuned model sees the same; ``command``: how it was
    trained)."""
    state, meta = load_checkpoint(path)
    if meta["config"]["model"] != cfg.model:
        raise ValueError(f"--init {path}: its architecture {meta['config']['model']} is not the preset's {cfg.model}")
    if meta["config"]["stride"] != cfg.stride or meta["config"]["threat"] != cfg.threat:
        raise ValueError(f"--init {path}: trained for masks of {meta['config']['threat']} at stride "
                         f"{meta['config']['stride']}, not {cfg.threat} at stride {cfg.stride}")
    model.load_state_dict(state)
    return meta


def train(cfg: TrainConfig, out: Path, data_dir: str | None = None, device: str = "cpu", preset: str = "custom",
          command: str = "", resume: bool = False, limit: int | None = None, monitor_every: int = 3) -> dict:
    """Train (or resume) a double-masking classifier under ``out``; returns the final checkpoint's metadata."""
    out.mkdir(parents=True, exist_ok=True)
    run = trainer.start(DEFENSE, cfg, data_dir, device, preset, command, images=limit or 0, val_images=0, out=out,
                        resume=resume)
    val_idx = np.random.default_rng(cfg.seed).permutation(run.val)[:32 if limit else MONITORED]
    hw = tuple(run.train.x.shape[1:3])
    masks = torch.from_numpy(mask_set(hw, cfg.threat, cfg.stride))
    model = classifier(run.num_classes, cfg.model)
    init = run.previous.get("init") if run.previous is not None else None
    if cfg.init and run.previous is None:
        record = start_from(model, Path(cfg.init), cfg)
        run.mean, run.std = record["mean"], record["std"]
        init = {"checkpoint": cfg.init, "command": record.get("command"), "commit": record.get("commit")}
    elif cfg.init:  # resuming a fine-tuning run: the weights are in the resume state, the inputs as it began
        run.mean, run.std = run.previous["mean"], run.previous["std"]
    model = model.to(run.device)
    teacher = load_teacher(Path(cfg.teacher), cfg, run.mean, run.std, run.device) if cfg.teacher else None
    geos = {s: geometry(model.unit_specs, s, hw) for s in cfg.feature_splits}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = trainer.steps_per_epoch(run, cfg.batch_size)
    schedule = (cfg.epochs * steps, int(cfg.warmup_epochs * steps))
    meta = {"defense": DEFENSE, "preset": preset, "command": command, "config": cfg.to_dict(),
            "num_classes": run.num_classes, "classes": run.train.classes, "mean": run.mean, "std": run.std,
            "input_hw": list(hw), "mask": {"threat": cfg.threat, "stride": cfg.stride, "value": cfg.mask_value,
                                           "space": "normalized input", "count": len(masks)},
            "dataset": run.dataset_meta() | {"monitored": f"{len(val_idx)} validation images", "limit": limit},
            "seed": cfg.seed, "commit": run.commit, "world_size": run.dist.world, "images": run.images,
            "resumed": run.resumed, "init": init, "epoch": 0, "step": 0, "minutes": 0.0, "history": []}
    if run.previous is not None:
        prev = trainer.load_state(out, model, [opt], run.rng)
        meta.update({k: prev[k] for k in ("epoch", "step", "minutes", "history")})
    data = run.fit_tensors()
    while meta["epoch"] < cfg.epochs:
        t0 = time.time()
        loss = _epoch(run, model, opt, data, masks, geos, meta, schedule, teacher)
        meta["epoch"] += 1
        meta["minutes"] += (time.time() - t0) / 60
        pairs = meta["epoch"] % monitor_every == 0 or meta["epoch"] == cfg.epochs
        val = monitor(model, run.train.x[val_idx], run.train.y[val_idx], run.mean, run.std, masks, cfg,
                      100 if pairs else 0)
        meta["history"].append({"epoch": meta["epoch"], "loss": loss, "minutes": meta["minutes"], "val": val})
        tqdm.write(json.dumps(meta["history"][-1]))
        trainer.save_state(out, model, [opt], meta, run.rng)
        save_checkpoint(model, meta, out / f"epoch{meta['epoch']:03d}.safetensors")
    save_checkpoint(model, meta, out / "model.safetensors")
    return meta


cli = typer.Typer(add_completion=False)


@cli.command("doublemask")
def train_command(
    preset: str = typer.Option("gtsrb-cpu", help=f"One of: {', '.join(PRESETS)}"),
    out: Path = typer.Option(..., help="Output folder: model.safetensors (+ .json), per-epoch and resume state"),
    epochs: Optional[int] = typer.Option(None, help="Override the preset's epochs"),
    seed: Optional[int] = typer.Option(None, help="Override the preset's seed"),
    stride: Optional[int] = typer.Option(None, help="Override the preset's mask stride"),
    worst_of: Optional[int] = typer.Option(None, help="Override the preset's greedy-cutout candidates (1 = random)"),
    init: Optional[str] = typer.Option(None, help="Start from this double-masking checkpoint (fine-tuning presets)"),
    teacher: Optional[str] = typer.Option(None, help="Distil from this pixel-space double-masking checkpoint "
                                                     "(same masks, classes and inputs)"),
    resume: bool = typer.Option(False, help="Carry on from OUT/last.safetensors (same preset and options; --epochs "
                                            "may be raised)"),
    limit: Optional[int] = typer.Option(None, help="Train on this many images only (a quick check)"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads [default: torch's]"),
) -> None:
    """Train a classifier for double masking (pixel- and feature-space masks from the certifier's mask set)."""
    if threads:
        torch.set_num_threads(threads)
    command = command_line("doublemask", preset, out, epochs=epochs, seed=seed, stride=stride, worst_of=worst_of,
                           init=init, teacher=teacher, limit=limit, threads=threads, resume=resume)
    cfg = config_for(preset, epochs=epochs, seed=seed, stride=stride, worst_of=worst_of, init=init, teacher=teacher)
    meta = train(cfg, out, data_dir, device, preset, command, resume, limit)
    typer.echo(json.dumps(meta["history"][-1] if meta["history"] else {}))
