"""Write the sample frames shipped in the package: real GTSRB test images and one training track, with their
true labels (``labels.json``).

    python -m certinfer.export.samples certinfer/data/samples

A GTSRB track is one physical sign photographed as the car approaches it (30 frames, growing), so it
plays as a short clip: ``track_<id>_<nn>.png`` sort after the single test images. GTSRB's test set has no
tracks (its images carry no track number), so the clip comes from the training set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from certinfer.train import data as datasets

TEST_IMAGES = 16  # the first test image of each of this many distinct classes, in test-set order
TRACK_CLASS = 14  # "Stop"


def _readme(test_rows: list[tuple[int, int, str]], track: int, track_rows: np.ndarray) -> str:
    lines = ["# Sample frames", "",
             "Real images from GTSRB (Stallkamp et al., Neural Networks 32, 2012; https://benchmark.ini.rub.de),",
             "32x32 RGB as in the project's data copy. Written by `python -m certinfer.export.samples`.", "",
             "| file | source | class |", "| --- | --- | --- |"]
    lines += [f"| gtsrb_test_{i:05d}.png | test set index {i} | {c} {name} |" for i, c, name in test_rows]
    lines += ["", f"`track_{track}_NN.png`: a clip from the GTSRB **training** set, not the test set (the test set "
                  f"has no tracks): training track {track} (class {TRACK_CLASS}), training indices "
                  f"{int(track_rows[0])}..{int(track_rows[-1])}, in capture order (the sign approaching the "
                  "camera). A bundle trained on GTSRB may have been trained on these very frames: its accuracy on "
                  "them proves little.",
              "", "`labels.json`: the true class of every frame (`frames`: file name -> class index into `classes`); "
                  "`certinfer run` without a SOURCE reports each verdict's `truth` and `correct` from it.", ""]
    return "\n".join(lines)


def _labels(classes: list[str], frames: dict[str, int]) -> str:
    return json.dumps({"classes": classes, "frames": frames}, indent=1) + "\n"


def make_samples(out: Path, data_dir: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    root = datasets.data_root(data_dir)
    test = datasets.load("gtsrb:test", root)
    seen: set[int] = set()
    rows, frames = [], {}
    for i, c in enumerate(test.y):
        if int(c) not in seen and len(seen) < TEST_IMAGES:
            seen.add(int(c))
            rows.append((i, int(c), test.classes[int(c)]))
            frames[f"gtsrb_test_{i:05d}.png"] = int(c)
            Image.fromarray(test.x[i]).save(out / f"gtsrb_test_{i:05d}.png")
    with np.load(root / "gtsrb" / "gtsrb32.npz", allow_pickle=False) as d:
        tracks, y, x = d["train_track"], d["y_train"], d["x_train"]
    track = int(np.unique(tracks[y == TRACK_CLASS])[0])
    track_rows = np.flatnonzero((tracks == track) & (y == TRACK_CLASS))
    for n, k in enumerate(track_rows):
        frames[f"track_{track}_{n:02d}.png"] = TRACK_CLASS
        Image.fromarray(x[k]).save(out / f"track_{track}_{n:02d}.png")
    (out / "README.md").write_text(_readme(rows, track, track_rows))
    (out / "labels.json").write_text(_labels(test.classes, frames))


if __name__ == "__main__":
    make_samples(Path(sys.argv[1]))
