"""Pieces every trainer shares: distributed setup, schedule, augmentation, batching, checkpoints.

A single process needs no launcher; under ``torchrun`` (RANK/WORLD_SIZE set) training runs with
DistributedDataParallel (gloo on CPU, nccl on CUDA) and each rank takes its own shard of every epoch.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if "RANK" not in os.environ:
        return Dist(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return Dist(rank, world, dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def cosine_lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup, then cosine decay to zero (Loshchilov & Hutter 2017)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def epoch_batches(n: int, batch: int, rng: np.random.Generator, d: Dist) -> list[np.ndarray]:
    """This rank's shuffled mini-batches of one epoch (every rank draws the same permutation)."""
    order = rng.permutation(n)
    per_rank = (n // d.world) // batch * batch  # equal step counts on every rank keep DDP in lockstep
    mine = order[d.rank * per_rank:(d.rank + 1) * per_rank]
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


def augment(x: torch.Tensor, rng: np.random.Generator, pad: int, flips: bool) -> torch.Tensor:
    """Random crops with zero padding ``pad`` and optional horizontal flips, on a uint8 NCHW batch."""
    n, _, h, w = x.shape
    if pad:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
        x = torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flips:
        flip = torch.from_numpy(rng.random(n) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def photometric(x: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """Per-image brightness and contrast jitter in [1 - strength, 1 + strength] on a uint8 NCHW batch."""
    if not strength:
        return x
    n = x.shape[0]
    bright, contrast = (torch.from_numpy(rng.uniform(1 - strength, 1 + strength, size=(n, 1, 1, 1))).float()
                        for _ in range(2))
    f = x.float()
    mean = f.mean(dim=(1, 2, 3), keepdim=True)
    return ((f - mean) * contrast + mean * bright).clamp(0, 255).to(torch.uint8)


def normalize(x_uint8: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, device=x_uint8.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x_uint8.device).view(1, -1, 1, 1)
    return (x_uint8.float() / 255.0 - m) / s


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def save_checkpoint(model: torch.nn.Module, meta: dict, path: Path) -> None:
    """Weights as safetensors (no pickle) and everything needed to rebuild the model as JSON beside them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(path)), json.loads(Path(path).with_suffix(".json").read_text())


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def preset_config(presets: dict, preset: str, defense: str, **overrides):
    """The named preset's config, with the overrides that are not None applied."""
    if preset not in presets:
        raise ValueError(f"unknown {defense} preset {preset!r}: choose from {sorted(presets)}")
    return replace(presets[preset], **{k: v for k, v in overrides.items() if v is not None})


def command_line(defense: str, preset: str, out: Path, **options) -> str:
    """The ``certinfer train`` command that reproduces a run (recorded in its checkpoint); options that are None
    (not given) are left out, while 0 is kept (``--seed 0`` overrides a preset's seed). ``dense_epochs`` is
    written ``--dense-epochs``, as typer names it; a flag that is True is written alone (``--resume``), one that is
    False not at all."""
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in options.items()
             if v is not None and v is not False]
    return " ".join([f"certinfer train {defense}", f"--preset {preset}", *flags, f"--out {out}"])
