"""The "no sign" class: what a sign classifier should answer about a box that holds no traffic sign.

A detector's false positives in a road scene are crops of road, sky, vegetation, vehicles and roadside clutter.
Two sources here give that, and neither can hold a GTSRB sign:

- crops of the 14 real dashcam frames (``frames/``), square, 24 to 192 pixels on a side, from the sky above the
  horizon band and the road below it on every frame, and from the whole frame only on the frames whose horizon
  band was checked by eye to hold no sign (the others have roadside signs and boards there). Three frames are
  held out, so the false-sign rate is measured on scenes training never saw;
- CIFAR-10 images (vehicles, animals, ships, planes: objects a detector may box by mistake; its training part
  for training, its test part for the held-out rate). Our CIFAR-10 copy is JPEG-compressed, which is harmless
  for a negative class.

GTSRB's own image borders were not used: at 32x32 they are a few pixels of the same sign.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

NAME = "no sign"  # the class name; always the last class of a bundle that has it
HELD_OUT = ("udacity_advlane_straight_lines2.jpg", "udacity_advlane_test6.jpg",
            "udacity_lanelines_solidYellowCurve.jpg")
# frames whose horizon band holds no sign or board (checked by eye); the rest give sky and road crops only
SIGN_FREE = {"udacity_advlane_test1.jpg", "udacity_advlane_test3.jpg", "udacity_advlane_test4.jpg",
             "udacity_advlane_test5.jpg", "udacity_advlane_test6.jpg"}
BAND = (0.30, 0.62)  # the horizon band, as shares of the frame height
SIDES = (24, 192)  # crop sides in frame pixels (log-uniform)
TRAIN_COUNT = 3000  # half dashcam crops, half CIFAR-10
TEST_COUNT = 2000


def check_classes(bundle_classes: list[str], dataset_classes: list[str], dataset: str) -> None:
    """Refuse a dataset whose classes are not the bundle's: as many, or the bundle's a last "no sign" more."""
    n, m = len(bundle_classes), len(dataset_classes)
    if n != m and not (n == m + 1 and bundle_classes[-1] == NAME):
        raise ValueError(f"the bundle has {n} classes but {dataset} has {m}: use the dataset the classifier "
                         "was trained for")


def _frames(root: Path, held_out: bool) -> list[tuple[str, np.ndarray]]:
    files = sorted(p for p in (root / "frames").glob("*.jpg") if (p.name in HELD_OUT) == held_out)
    return [(p.name, np.asarray(Image.open(p).convert("RGB"))) for p in files]


def _regions(name: str, h: int) -> list[tuple[int, int]]:
    """Row ranges a crop may lie in: the whole frame, or the sky and the road."""
    if name in SIGN_FREE:
        return [(0, h)]
    return [(0, int(BAND[0] * h)), (int(BAND[1] * h), h)]


def dashcam_crops(root: Path, n: int, rng: np.random.Generator, held_out: bool,
                  hw: tuple[int, int] = (32, 32)) -> np.ndarray:
    """``n`` sign-free square crops of the training (or held-out) dashcam frames, resized to ``hw``."""
    frames = _frames(root, held_out)
    out = np.empty((n, *hw, 3), np.uint8)
    for i in range(n):
        name, frame = frames[rng.integers(len(frames))]
        h, w = frame.shape[:2]
        regions = [(a, b) for a, b in _regions(name, h) if b - a >= SIDES[0]]
        top, bottom = regions[rng.integers(len(regions))]
        side = int(np.exp(rng.uniform(np.log(SIDES[0]), np.log(min(SIDES[1], bottom - top, w)))))
        y = int(rng.integers(top, bottom - side + 1))
        x = int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(frame[y:y + side, x:x + side])
        out[i] = np.asarray(crop.resize((hw[1], hw[0]), Image.BILINEAR))
    return out


def cifar_images(root: Path, n: int, rng: np.random.Generator, part: str, hw: tuple[int, int] = (32, 32)) -> np.ndarray:
    """``n`` CIFAR-10 images of a part, drawn without replacement (only those are decoded)."""
    with np.load(root / "cifar10" / "cifar10_jpeg_q75.npz", allow_pickle=False) as d:
        buf, offsets = d[f"{part}_jpeg"], d[f"{part}_offsets"]
    idx = np.sort(rng.choice(len(offsets) - 1, size=n, replace=False))
    images = [Image.open(io.BytesIO(buf[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB") for i in idx]
    return np.stack([np.asarray(im if im.size == (hw[1], hw[0]) else im.resize((hw[1], hw[0]), Image.BILINEAR))
                     for im in images])


def background(root: Path, part: str, seed: int, hw: tuple[int, int] = (32, 32), n: int | None = None) -> np.ndarray:
    """``n`` "no sign" images (default: 3,000 for ``train``, 2,000 for ``test``), half dashcam crops and half
    CIFAR-10, from the training frames and CIFAR-10's training part, or from the held-out frames and its test part."""
    if part not in ("train", "test"):
        raise ValueError(f"background part {part!r}: use train or test")
    n = n if n is not None else (TRAIN_COUNT if part == "train" else TEST_COUNT)
    rng = np.random.default_rng([seed, part == "test"])
    crops = dashcam_crops(root, n // 2, rng, held_out=part == "test", hw=hw)
    return np.concatenate([crops, cifar_images(root, n - n // 2, rng, part, hw)])
