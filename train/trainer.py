"""The skeleton every trainer shares: presets and overrides, a run's data, the epoch loop, the checkpoint, and the
``certinfer train NAME`` command.

A defense's trainer module defines its ``TrainConfig`` dataclass (fields ``dataset``, ``epochs``, ``seed`` and
``input_hw`` at least), its ``PRESETS``, and ``train(cfg, out, data_dir, device, preset, command) -> metrics``
written as :func:`start` (process group, seeded generator, splits, normalization), :func:`run_epochs` over
:func:`train_epoch` (or its own step), and :func:`finish` (test metrics, checkpoint, ``metrics.json``). Its
command is ``cli = trainer_cli(NAME, train, PRESETS, ...)``.

Every run can go on in pieces. After each epoch the skeleton writes the resume state under ``--out``:
``last.safetensors`` (the weights; ``last.json`` beside it: epoch, step, history, minutes, config, commit),
``optimizer.safetensors`` (every optimizer's state) and ``rng.json`` (the numpy and torch generators), all without
pickle. ``certinfer train NAME ... --resume`` carries on from there with the epochs, the history, the training
minutes and the learning-rate schedule where they stopped; it refuses a different preset or config (``--epochs``
may be raised, to train longer), a different number of processes, and an ``--out`` without a resume state. A run
cut short and resumed gives the same weights as one run straight through (same machine and threads). The finished
``model.safetensors`` records the total training minutes (``metrics.train_minutes``) and one entry per piece
that resumed (``resumed``). A trainer passes its network, optimizers and any extra ``torch.Generator`` to
:func:`run_epochs`; one with its own loop (double masking) uses :func:`save_state` and :func:`load_state`.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import typer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from certinfer.provenance import git_commit
from certinfer.train import background as no_sign
from certinfer.train import data as datasets
from certinfer.train.loop import (Dist, command_line, epoch_batches, preset_config, save_checkpoint, seed_everything,
                                  setup_distributed, teardown_distributed, to_nchw)

LAST = "last.safetensors"  # the resume state under --out: these weights (+ last.json), the optimizers, the RNGs
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.json"

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
    out: Path | None = None  # where the resume state goes (None: nowhere)
    images: dict = field(default_factory=dict)  # start()'s image limits, recorded so that a resume uses the same
    previous: dict | None = None  # resuming: the resume state's last.json
    resumed: list[dict] = field(default_factory=list)  # one entry per piece that resumed, this one included
    minutes_before: float = 0.0  # training minutes of the earlier pieces
    step: int = 0  # optimizer steps so far (every piece)

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
        """Training minutes so far, the earlier pieces' included."""
        return self.minutes_before + (time.time() - self.started) / 60

    def state_record(self) -> dict:
        """What the resume state's last.json holds besides its epoch, step, minutes and history."""
        return {"defense": self.defense, "preset": self.preset, "command": self.command, "config": asdict(self.cfg),
                "commit": self.commit, "world_size": self.dist.world, "images": self.images,
                "resumed": self.resumed, "num_classes": self.num_classes, "classes": self.train.classes,
                "mean": self.mean, "std": self.std, "input_hw": list(self.cfg.input_hw), "seed": self.cfg.seed}

    def dataset_meta(self) -> dict:
        validation = "tracks" if self.train.groups is not None else "images"
        meta = {"train": self.train.name, "test": self.test.name, "note": self.train.note,
                "validation": f"{VALIDATION:.0%} of {validation}"}
        if self.train.classes[-1] == no_sign.NAME:
            meta["background"] = (f"{no_sign.NAME}: {no_sign.TRAIN_COUNT} images, half crops of 11 dashcam frames, "
                                  "half CIFAR-10 train (see certinfer.train.background)")
        return meta


def start(defense: str, cfg, data_dir: str | None = None, device: str = "auto", preset: str = "custom",
          command: str = "", *, images: int = 0, val_images: int | None = None, test_images: int = 0,
          out: Path | None = None, resume: bool = False) -> Run:
    """Set up a run: process group, seeds, both parts of ``cfg.dataset`` and the index sets.

    ``images``: at most this many fit, validation and test images (0: all; smoke tests); ``val_images``
    overrides it for validation; ``test_images``: the first this many test images (0: all). ``out``: where
    :func:`run_epochs` writes the resume state; ``resume``: carry on from the one there (checked here, before any
    data is loaded: see :func:`check_resume`).
    """
    d = setup_distributed(device)
    limits = {"images": images, "val_images": val_images, "test_images": test_images}
    if resume and out is None:
        raise ValueError("--resume needs --out, the folder of the run to carry on")
    previous = check_resume(Path(out), defense, preset, cfg, d.world, limits) if resume else None
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
    run = Run(defense, cfg, preset, command, d, rng, commit, train, test, fit, val, tested, mean, std,
              out=None if out is None else Path(out), images=limits)
    if previous is not None:
        run.previous, run.minutes_before, run.step = previous, float(previous["minutes"]), int(previous["step"])
        run.commit = previous["commit"]  # the code that began training; each piece's is in ``resumed``
        run.resumed = [*previous.get("resumed", []), resumed_entry(previous, cfg.epochs, commit, command)]
    return run


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
        run.step += 1
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", refresh=False)
    return float(np.mean(losses)) if losses else float("nan")


def steps_per_epoch(run: Run, batch_size: int) -> int:
    """Mini-batches per epoch on this rank (draws one permutation from the run's generator, as an epoch does)."""
    return len(epoch_batches(len(run.fit), batch_size, run.rng, run.dist))


def run_epochs(run: Run, step: Callable[[int], dict], validate: Callable[[], dict], every: int, *,
               net: torch.nn.Module | None = None, optimizers: Iterable[torch.optim.Optimizer] = (),
               generators: Iterable[torch.Generator] = ()) -> list[dict]:
    """``cfg.epochs`` epochs: ``step(epoch)`` trains one and returns its row (``loss``...); on the main process
    ``validate()`` adds to the row every ``every`` epochs and after the last. One JSON line per epoch.

    With ``net`` (unwrapped, not the DDP module), its ``optimizers`` and any ``generators`` the steps draw from
    besides ``run.rng`` and torch's global one, the main process writes the resume state to ``run.out`` after
    every epoch; a resumed run loads it here first and goes on from the epoch after the last one saved.
    """
    optimizers, generators = list(optimizers), list(generators)
    history: list[dict] = []
    first = 0
    if run.previous is not None:
        if net is None:
            raise ValueError(f"{run.defense} training cannot resume (its trainer saves no resume state)")
        saved = load_state(run.out, net, optimizers, run.rng, generators)
        history, first = list(saved["history"]), int(saved["epoch"])
    for epoch in range(first, run.cfg.epochs):
        t0 = time.time()
        row = {"epoch": epoch + 1, **step(epoch)}
        row["epoch_seconds"] = time.time() - t0
        if run.dist.main and (epoch % every == every - 1 or epoch == run.cfg.epochs - 1):
            row.update(validate())
        row["minutes"] = run.minutes()
        history.append(row)
        if run.dist.main:
            tqdm.write(json.dumps(row))
            if run.out is not None and net is not None:
                meta = {**run.state_record(), "epoch": epoch + 1, "step": run.step, "minutes": run.minutes(),
                        "history": history}
                save_state(run.out, net, optimizers, meta, run.rng, generators)
    return history


def finish(run: Run, net: torch.nn.Module, out: Path, history: list[dict], test: Callable[[], dict],
           **meta) -> dict:
    """On the main process: ``test()`` (the test metrics: ``test`` and any notes), then the checkpoint
    ``out/model.safetensors`` with everything to rebuild and export it (``meta`` adds defense-specific entries;
    ``metrics.train_minutes`` counts every piece of a resumed run, ``resumed`` lists the pieces after the first)
    and ``out/metrics.json``. Ends the process group; returns the metrics (empty on other ranks)."""
    metrics: dict = {}
    if run.dist.main:
        metrics = {**test(), "history": history, "train_minutes": run.minutes()}
        cfg = run.cfg
        record = {"defense": run.defense, "preset": run.preset, "command": run.command, "config": asdict(cfg),
                  "num_classes": run.num_classes, "classes": run.train.classes, "mean": run.mean, "std": run.std,
                  "input_hw": list(cfg.input_hw), "dataset": run.dataset_meta(), "seed": cfg.seed,
                  "commit": run.commit, "world_size": run.dist.world, "resumed": run.resumed, "metrics": metrics,
                  **meta}
        save_checkpoint(net, record, Path(out) / "model.safetensors")
        (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2))
    teardown_distributed()
    return metrics


# --- resuming ---------------------------------------------------------------------------------------------

def _normal(value: Any) -> Any:
    """As JSON gives it back (tuples as lists), for comparing a config with the one a checkpoint recorded."""
    return json.loads(json.dumps(value))


def check_resume(out: Path, defense: str, preset: str, cfg, world: int, images: dict | None = None) -> dict:
    """The resume state's last.json under ``out``, if this run may carry on from it: the same defense, preset,
    config (but ``epochs``, which may be raised, not below the epochs done), number of processes and image limits.
    Raises ValueError with one line saying why not."""
    path = out / LAST
    if not path.is_file() or not path.with_suffix(".json").is_file():
        raise ValueError(f"nothing to resume from: no {path} (start without --resume)")
    prev = json.loads(path.with_suffix(".json").read_text())
    if prev.get("defense", defense) != defense:
        raise ValueError(f"cannot resume {out}: it holds a {prev['defense']} run, not {defense}")
    if prev.get("preset") != preset:
        raise ValueError(f"cannot resume {out}: it was trained with --preset {prev.get('preset')}, not {preset}")
    old, new = _normal(prev["config"]), _normal(asdict(cfg))
    changed = [k for k in sorted(old.keys() | new.keys()) if k != "epochs" and old.get(k) != new.get(k)]
    if changed:
        diffs = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume {out}: its config differs ({diffs}); only --epochs may change")
    if new["epochs"] < prev["epoch"]:
        raise ValueError(f"cannot resume {out}: it has trained {prev['epoch']} epochs, more than --epochs "
                         f"{new['epochs']}")
    if prev.get("world_size", world) != world:
        raise ValueError(f"cannot resume {out}: it trained in {prev['world_size']} processes, this run has {world}")
    if images is not None and "images" in prev and _normal(prev["images"]) != _normal(images):
        raise ValueError(f"cannot resume {out}: its image limits differ ({prev['images']} -> {images})")
    return prev


def resumed_entry(prev: dict, epochs: int, commit: str, command: str) -> dict:
    """The ``resumed`` entry of a piece that carries on from ``prev`` (a resume state's last.json)."""
    return {"epoch": prev["epoch"], "epochs_before": prev["config"]["epochs"], "epochs": epochs, "commit": commit,
            "command": command}


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file and rename: a process killed meanwhile leaves the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def save_state(out: Path, net: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer], meta: dict,
               rng: np.random.Generator, generators: Iterable[torch.Generator] = ()) -> None:
    """The resume state under ``out``, each file tagged with ``meta["epoch"]``: ``last.safetensors`` (the
    weights; ``meta`` in last.json), ``optimizer.safetensors`` (tensors ``O.I.NAME``: optimizer O, parameter I
    of its state_dict; the learning rates in the metadata) and ``rng.json`` (``rng``'s state, torch's CPU and
    CUDA states and ``generators``', base64). No pickle anywhere."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    epoch = str(meta["epoch"])
    tensors, lrs = {}, []
    for o, opt in enumerate(optimizers):
        state = opt.state_dict()
        lrs.append([group["lr"] for group in state["param_groups"]])
        for i, entry in state["state"].items():
            for name, value in entry.items():
                tensors[f"{o}.{i}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    _write(out / OPTIMIZER, lambda p: save_file(tensors, p, metadata={"epoch": epoch, "lr": json.dumps(lrs)}))
    rngs = {"epoch": meta["epoch"], "numpy": rng.bit_generator.state, "torch": _b64(torch.get_rng_state()),
            "cuda": _b64(torch.cuda.get_rng_state()) if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None, "generators": [_b64(g.get_state()) for g in generators]}
    _write(out / RNG, lambda p: Path(p).write_text(json.dumps(rngs)))
    weights = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    _write(out / LAST, lambda p: save_file(weights, p, metadata={"epoch": epoch}))
    _write(out / LAST.replace(".safetensors", ".json"), lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def load_state(out: Path, net: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer],
               rng: np.random.Generator, generators: Iterable[torch.Generator] = ()) -> dict:
    """Load :func:`save_state`'s files (or a double-masking run's from before it) into ``net``, ``optimizers``,
    ``rng``, torch's generators and ``generators``, in place; returns last.json. Raises ValueError when the files
    are not of one epoch (a process killed while saving) or do not fit."""
    out, optimizers, generators = Path(out), list(optimizers), list(generators)
    meta = json.loads((out / LAST).with_suffix(".json").read_text())
    rngs = json.loads((out / RNG).read_text())
    legacy = "numpy" not in rngs  # double masking before the shared state: numpy's state alone, torch's in OPTIMIZER
    with safe_open(str(out / OPTIMIZER), "pt") as f:
        tagged = f.metadata() or {}
    with safe_open(str(out / LAST), "pt") as f:
        tagged_weights = f.metadata() or {}
    epochs = {str(meta["epoch"]), tagged.get("epoch", str(meta["epoch"])),
              tagged_weights.get("epoch", str(meta["epoch"])), str(rngs.get("epoch", meta["epoch"]))}
    if len(epochs) > 1:
        raise ValueError(f"cannot resume {out}: its resume files are of different epochs ({', '.join(sorted(epochs))}"
                         "; the run was stopped while saving)")
    try:
        net.load_state_dict(load_file(str(out / LAST)))
    except RuntimeError as e:
        raise ValueError(f"cannot resume {out}: its weights do not fit this network ({str(e).splitlines()[0]})")
    tensors = load_file(str(out / OPTIMIZER))
    lrs = json.loads(tagged.get("lr", "[]"))
    for o, opt in enumerate(optimizers):
        current = opt.state_dict()
        sizes = [len(group["params"]) for group in current["param_groups"]]
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key == "torch_rng":
                continue
            if legacy:  # GROUP.INDEX.NAME of the one optimizer
                g, i, name = key.split(".", 2)
                index = sum(sizes[:int(g)]) + int(i)
            else:
                which, i, name = key.split(".", 2)
                if int(which) != o:
                    continue
                index = int(i)
            state.setdefault(index, {})[name] = value
        if legacy and o:
            state = {}
        opt.load_state_dict({"state": state, "param_groups": current["param_groups"]})
        for group, lr in zip(opt.param_groups, lrs[o] if o < len(lrs) else []):
            group["lr"] = lr
    rng.bit_generator.state = rngs if legacy else rngs["numpy"]
    torch.set_rng_state(tensors["torch_rng"] if legacy else _unb64(rngs["torch"]))
    if not legacy:
        if rngs.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state(_unb64(rngs["cuda"]))
        if len(rngs["generators"]) != len(generators):
            raise ValueError(f"cannot resume {out}: it saved {len(rngs['generators'])} extra generators, this run "
                             f"has {len(generators)}")
        for g, state in zip(generators, rngs["generators"]):
            g.set_state(_unb64(state))
    return meta


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
RESUME = Override("resume", bool, "Carry on from OUT/last.safetensors (same preset and options; --epochs may be "
                  "raised)", config=False)  # every trainer_cli command has it, last


def _parameters(presets: dict, default: str, overrides: tuple[Override, ...]) -> list[inspect.Parameter]:
    keyword = inspect.Parameter.KEYWORD_ONLY
    fixed = [
        ("preset", str, typer.Option(default, help=f"One of: {', '.join(presets)}")),
        ("out", Path, typer.Option(..., help="Output folder for model.safetensors, its .json, metrics.json and the "
                                        "resume state (last.safetensors...)")),
        *((o.name, Optional[o.type], typer.Option(None, help=o.help)) for o in overrides),
        ("data_dir", Optional[str],
         typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]")),
        ("device", str, typer.Option("auto", help="auto, cpu or cuda")),
    ]
    return [inspect.Parameter(name, keyword, default=default_, annotation=kind) for name, kind, default_ in fixed]


def trainer_cli(defense: str, train: Callable[..., dict], presets: dict, default: str, summary: str,
                overrides: tuple[Override, ...] = (EPOCHS, SEED, LIMIT, THREADS)) -> typer.Typer:
    """The typer app behind ``certinfer train DEFENSE``: ``--preset``, ``--out``, one option per override (in the
    order the recorded command lists them), ``--resume``, ``--data-dir`` and ``--device``. Prints the test
    metrics. ``train`` gets ``resume=True`` when ``--resume`` is given."""
    overrides = (*(o for o in overrides if o.name != RESUME.name), RESUME)

    def command(preset: str, out: Path, data_dir: str | None, device: str, **given: Any) -> None:
        options = {o.name: given[o.name] for o in overrides}  # the recorded order, whatever order they came in
        if options.get("threads"):
            torch.set_num_threads(options["threads"])
        cfg = preset_config(presets, preset, defense, **{o.name: options[o.name] for o in overrides if o.config})
        resume = {"resume": True} if options["resume"] else {}
        metrics = train(cfg, out, data_dir, device, preset, command_line(defense, preset, out, **options), **resume)
        if metrics:
            typer.echo(json.dumps(metrics["test"]))

    params = _parameters(presets, default, overrides)
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = summary
    app = typer.Typer(add_completion=False)
    app.command(defense)(command)
    return app
