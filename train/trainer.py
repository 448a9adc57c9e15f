"""The skeleton every trainer shares: presets and overrides, a run's data, the epoch loop, the checkpoint, and the
``certinfer train NAME`` command.

A defense's trainer module defines its ``TrainConfig`` dataclass (fields ``dataset``, ``epochs``, ``seed`` and
``input_hw`` at least), its ``PRESETS``, and ``train(cfg, out, data_dir, device, preset, command) -> metrics``
written as :func:`start` (process group, seeded generator, splits, normalization), :func:`run_epochs` over
:func:`train_epoch` (or its own step), and :func:`finish` (test metrics, checkpoint, ``metrics.json``). Its
command is ``cli = trainer_cli(NAME, train, PRESETS, ...)``.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import typer
from tqdm import tqdm

from certinfer.provenance import git_commit
from certinfer.train import background as no_sign
from certinfer.train import data as datasets
from certinfer.train.loop import (Dist, command_line, epoch_batches, preset_config, save_checkpoint, seed_everything,
                                  setup_distributed, teardown_distributed, to_nchw)

VALIDATION = 0.05  # share of the training part's groups (GTSRB tracks) held out for validation
Loss = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def limit(idx: np.ndarray, n: int, seed: int) -> np.ndarray:
    """At most ``n`` of ``idx`` (0: all), drawn with ``seed`` and kept in order."""
    if not n or len(idx) <= n:
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))


# --- a run ------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One training run: the process group, the seeded generator, the data, and what the checkpoint records.

    ``fit`` and ``val`` index the training part (validation holds out whole groups, see
    :func:`certinfer.train.data.holdout`), ``tested`` the test part. ``mean`` and ``std`` are the fit images'
    channel statistics; a trainer whose network takes other inputs sets its own before :func:`finish`.
    """

    defense: str
    cfg: Any
    preset: str
    command: str
    dist: Dist
    rng: np.random.Generator
    commit: str
    train: datasets.Split
    test: datasets.Split
    fit: np.ndarray
    val: np.ndarray
    tested: np.ndarray
    mean: list[float]
    std: list[float]
    started: float = field(default_factory=time.time)

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def fit_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fit images as uint8 NCHW and their labels."""
        return to_nchw(self.train.x[self.fit]), torch.from_numpy(self.train.y[self.fit])

    def minutes(self) -> float:
        return (time.time() - self.started) / 60

    def dataset_meta(self) -> dict:
        validation = "tracks" if self.train.groups is not None else "images"
        meta = {"train": self.train.name, "test": self.test.name, "note": self.train.note,
                "validation": f"{VALIDATION:.0%} of {validation}"}
        if self.train.classes[-1] == no_sign.NAME:
            meta["background"] = (f"{no_sign.NAME}: {no_sign.TRAIN_COUNT} images, half crops of 11 dashcam frames, "
                                  "half CIFAR-10 train (see certinfer.train.background)")
        return meta


def start(defense: str, cfg, data_dir: str | None = None, device: str = "auto", preset: str = "custom",
          command: str = "", *, images: int = 0, val_images: int | None = None, test_images: int = 0) -> Run:
    """Set up a run: process group, seeds, both parts of ``cfg.dataset`` and the index sets.

    ``images``: at most this many fit, validation and test images (0: all; smoke tests); ``val_images``
    overrides it for validation; ``test_images``: the first this many test images (0: all).
    """
    d = setup_distributed(device)
    commit = git_commit()  # the code that trains, not whatever HEAD is when training ends
    rng = seed_everything(cfg.seed)
    train = datasets.load(datasets.part_spec(cfg.dataset, "train"), data_dir, cfg.input_hw)
    test = datasets.load(datasets.part_spec(cfg.dataset, "test"), data_dir, cfg.input_hw)
    if getattr(cfg, "background", False):
        train = with_background(train, no_sign.background(datasets.data_root(data_dir), "train", cfg.seed,
                                                          cfg.input_hw))
    fit, val = datasets.holdout(train, VALIDATION, cfg.seed)
    fit = limit(fit, images, cfg.seed)
    val = limit(val, images if val_images is None else val_images, cfg.seed + 1)
    tested = limit(np.arange(min(len(test.y), test_images or len(test.y))), images, cfg.seed + 2)
    mean, std = datasets.channel_stats(train.x[fit])
    return Run(defense, cfg, preset, command, d, rng, commit, train, test, fit, val, tested, mean, std)


def with_background(split: datasets.Split, images: np.ndarray) -> datasets.Split:
    """The split with a last class, "no sign", of ``images`` (each its own validation group)."""
    label = len(split.classes)
    groups = None if split.groups is None else np.concatenate([split.groups, -1 - np.arange(len(images))])
    return datasets.Split(np.concatenate([split.x, images]), np.concatenate([split.y, np.full(len(images), label)]),
                          [*split.classes, no_sign.NAME], split.name, split.note, groups)


def _progress(items: list, desc: str, d: Dist) -> tqdm:
    return tqdm(items, desc=desc, disable=not d.main, leave=False, mininterval=1 if sys.stderr.isatty() else 30)


def train_epoch(run: Run, epoch: int, model: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer],
                lr: Callable[[int], float], loss: Callable[[np.ndarray, float], Loss]) -> float:
    """One epoch over this rank's shuffled mini-batches of ``cfg.batch_size``; returns the mean reported loss.

    Per mini-batch (indices into the fit images): every optimizer's learning rate is set to ``lr(step)`` (``step``
    counts mini-batches from the first epoch on); ``loss(idx, at)`` (``at``: the fractional epoch) returns the
    loss to minimize, or (the loss to minimize, the loss to report); then one optimizer step.
    """
    model.train()
    batches = epoch_batches(len(run.fit), run.cfg.batch_size, run.rng, run.dist)
    optimizers = list(optimizers)
    bar = _progress(batches, f"epoch {epoch + 1}/{run.cfg.epochs}", run.dist)
    losses = []
    for b, idx in enumerate(bar):
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr(epoch * len(batches) + b)
        value = loss(idx, epoch + b / len(batches))
        objective, shown = value if isinstance(value, tuple) else (value, value)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        objective.backward()
        for opt in optimizers:
            opt.step()
        losses.append(shown.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
    return float(np.mean(losses)) if losses else float("nan")


def steps_per_epoch(run: Run, batch_size: int) -> int:
    """Mini-batches per epoch on this rank (draws one permutation from the run's generator, as an epoch does)."""
    return len(epoch_batches(len(run.fit), batch_size, run.rng, run.dist))


def run_epochs(run: Run, step: Callable[[int], dict], validate: Callable[[], dict], every: int) -> list[dict]:
    """``cfg.epochs`` epochs: ``step(epoch)`` trains one and returns its row (``loss``...); on the main process
    ``validate()`` adds to the row every ``every`` epochs and after the last. One JSON line per epoch."""
    history = []
    for epoch in range(run.cfg.epochs):
        t0 = time.time()
        row = {"epoch": epoch + 1, **step(epoch)}
        row["epoch_seconds"] = time.time() - t0
        if run.dist.main and (epoch % every == every - 1 or epoch == run.cfg.epochs - 1):
            row.update(validate())
        row["minutes"] = run.minutes()
        history.append(row)
        if run.dist.main:
            tqdm.write(json.dumps(row))
    return history


def finish(run: Run, net: torch.nn.Module, out: Path, history: list[dict], test: Callable[[], dict],
           **meta) -> dict:
    """On the main process: ``test()`` (the test metrics: ``test`` and any notes), then the checkpoint
    ``out/model.safetensors`` with everything to rebuild and export it (``meta`` adds defense-specific entries)
    and ``out/metrics.json``. Ends the process group; returns the metrics (empty on other ranks)."""
    metrics: dict = {}
    if run.dist.main:
        metrics = {**test(), "history": history, "train_minutes": run.minutes()}
        cfg = run.cfg
        record = {"defense": run.defense, "preset": run.preset, "command": run.command, "config": asdict(cfg),
                  "num_classes": run.num_classes, "classes": run.train.classes, "mean": run.mean, "std": run.std,
                  "input_hw": list(cfg.input_hw), "dataset": run.dataset_meta(), "seed": cfg.seed,
                  "commit": run.commit, "world_size": run.dist.world, "metrics": metrics, **meta}
        save_checkpoint(net, record, Path(out) / "model.safetensors")
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    teardown_distributed()
    return metrics


# --- the command ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Override:
    """A ``certinfer train`` option that overrides one config field (not given: the preset's value)."""

    name: str
    type: type
    help: str
    config: bool = True  # False: a process setting (threads), recorded in the command but not in the config


EPOCHS = Override("epochs", int, "Override the preset's epochs")
SEED = Override("seed", int, "Override the preset's seed")
LIMIT = Override("limit", int, "At most this many images per split (smoke tests)")
THREADS = Override("threads", int, "torch CPU threads [default: torch's]", config=False)


def _parameters(presets: dict, default: str, overrides: tuple[Override, ...]) -> list[inspect.Parameter]:
    keyword = inspect.Parameter.KEYWORD_ONLY
    fixed = [
        ("preset", str, typer.Option(default, help=f"One of: {', '.join(presets)}")),
        ("out", Path, typer.Option(..., help="Output folder for model.safetensors, its .json and metrics.json")),
        *((o.name, Optional[o.type], typer.Option(None, help=o.help)) for o in overrides),
        ("data_dir", Optional[str],
         typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]")),
        ("device", str, typer.Option("auto", help="auto, cpu or cuda")),
    ]
    return [inspect.Parameter(name, keyword, default=default_, annotation=kind) for name, kind, default_ in fixed]


def trainer_cli(defense: str, train: Callable[..., dict], presets: dict, default: str, summary: str,
                overrides: tuple[Override, ...] = (EPOCHS, SEED, LIMIT, THREADS)) -> typer.Typer:
    """The typer app behind ``certinfer train DEFENSE``: ``--preset``, ``--out``, one option per override (in the
    order the recorded command lists them), ``--data-dir`` and ``--device``. Prints the test metrics."""

    def command(preset: str, out: Path, data_dir: str | None, device: str, **given: Any) -> None:
        options = {o.name: given[o.name] for o in overrides}  # the recorded order, whatever order they came in
        if options.get("threads"):
            torch.set_num_threads(options["threads"])
        cfg = preset_config(presets, preset, defense, **{o.name: options[o.name] for o in overrides if o.config})
        metrics = train(cfg, out, data_dir, device, preset, command_line(defense, preset, out, **options))
        if metrics:
            typer.echo(json.dumps(metrics["test"]))

    params = _parameters(presets, default, overrides)
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = summary
    app = typer.Typer(add_completion=False)
    app.command(defense)(command)
    return app
