"""Datasets as in-memory uint8 arrays: GTSRB and CIFAR-10 from ../shared/data, or a user's image folder.

Every loader returns a :class:`Split` of HWC uint8 RGB images and int64 labels; nothing is unpickled
(``allow_pickle=False``) and nothing is downloaded.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp"}


@dataclass
class Split:
    x: np.ndarray  # (N, H, W, 3) uint8
    y: np.ndarray  # (N,) int64
    classes: list[str]
    name: str
    note: str = ""  # e.g. "JPEG-compressed (lossy) copy"
    groups: np.ndarray | None = None  # (N,) images that must stay together (GTSRB: one physical sign's track)


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The shared data folder: an explicit path, $CERTINFER_DATA, or ../shared/data beside the checkout."""
    if path is not None:
        return Path(path)
    if env := os.environ.get("CERTINFER_DATA"):
        return Path(env)
    here = Path(__file__).resolve()
    for parent in (Path.cwd(), *Path.cwd().parents, *here.parents):
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    raise FileNotFoundError("no data folder: pass --data-dir or set CERTINFER_DATA (expected ../shared/data)")


def load_gtsrb(part: str, root: Path) -> Split:
    """A GTSRB part; the training part's ``groups`` are its tracks (class and track number)."""
    with np.load(root / "gtsrb" / "gtsrb32.npz", allow_pickle=False) as d:
        y = d[f"y_{part}"].astype(np.int64)
        groups = y * 100000 + d["train_track"].astype(np.int64) if part == "train" else None
        return Split(d[f"x_{part}"], y, [str(c) for c in d["class_names"]], f"gtsrb:{part}", groups=groups)


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(buf[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                     for i in range(len(offsets) - 1)])


def load_cifar10(part: str, root: Path) -> Split:
    if part == "test-exact":  # the 4,593 test images whose exact pixels survive (see the data README)
        with np.load(root / "cifar10" / "cifar10_test_exact_partial.npz", allow_pickle=False) as d:
            return Split(d["x"], d["y"].astype(np.int64), [str(c) for c in d["classes"]], "cifar10:test-exact",
                         note="CIFAR-10 exact pixels, 4,593 of the 10,000 test images")
    with np.load(root / "cifar10" / "cifar10_jpeg_q75.npz", allow_pickle=False) as d:
        x = _decode_jpegs(d[f"{part}_jpeg"], d[f"{part}_offsets"])
        return Split(x, d[f"y_{part}"].astype(np.int64), [str(c) for c in d["classes"]], f"cifar10:{part}",
                     note="CIFAR-10 JPEG-compressed (quality 75, lossy) copy")


def load_image_folder(root: Path, hw: tuple[int, int] = (32, 32)) -> Split:
    """``root/<class name>/<image>``: classes in name order, images resized to ``hw``."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root}: expected one sub-folder per class")
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                xs.append(np.asarray(Image.open(f).convert("RGB").resize((hw[1], hw[0]), Image.BILINEAR)))
                ys.append(label)
    return Split(np.stack(xs), np.asarray(ys, np.int64), classes, f"folder:{root}")


def part_spec(dataset: str, part: str) -> str:
    """The spec of a dataset's ``train`` or ``test`` part: ``gtsrb:test``, or ``folder:ROOT/test``."""
    return f"{dataset}/{part}" if dataset.startswith("folder:") else f"{dataset}:{part}"


def load(spec: str, data_dir: str | os.PathLike | None = None, hw: tuple[int, int] = (32, 32)) -> Split:
    """``gtsrb:train|test``, ``cifar10:train|test|test-exact`` or ``folder:PATH`` (PATH/<class>/<image>)."""
    name, _, part = spec.partition(":")
    if name == "folder":
        return load_image_folder(Path(part), hw)
    if part not in ("train", "test") and spec != "cifar10:test-exact":
        raise ValueError(f"dataset spec {spec!r}: use gtsrb:train|test, cifar10:train|test|test-exact or folder:PATH")
    loaders = {"gtsrb": load_gtsrb, "cifar10": load_cifar10}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}: choose from {sorted(loaders)} or folder:PATH")
    return loaders[name](part, data_root(data_dir))


def holdout(split: Split, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices: ``frac`` of the split's groups held out whole (of its images, without groups),
    so validation never sees a physical sign that training saw."""
    groups = split.groups if split.groups is not None else np.arange(len(split.y))
    uniq = np.unique(groups)
    held = np.random.default_rng(seed).choice(uniq, size=max(1, int(frac * len(uniq))), replace=False)
    val = np.isin(groups, held)
    return np.flatnonzero(~val), np.flatnonzero(val)


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    f = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    return f.mean(axis=0).round(4).tolist(), f.std(axis=0).round(4).tolist()
