"""Build the packaged detector example (``certinfer/data/examples/roadside``): two real dashcam frames with
GTSRB test signs placed in them by hand, and a detector's boxes for them as JSON lines.

The dashcam frames have no sign labels (and their few real signs are US signs, not GTSRB classes), so the signs
are GTSRB test images enlarged and pasted at roadside places; the boxes also hold the false positives a sign
detector makes (cars, trees, a fence) and one box too small to certify. Every box carries its ``truth`` (a GTSRB
class name, or "no sign"), an extra field the runtime ignores. Both frames are ones the "no sign" class was not
trained on. Run ``python -m certinfer.bench.roi_example`` to rebuild it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from PIL import Image

from certinfer.train.background import HELD_OUT, NAME as NO_SIGN
from certinfer.train.data import data_root, load as load_data

# frame -> signs (GTSRB class, x, y, side) and false positives (what, x0, y0, x1, y1)
SCENES: dict[str, dict] = {
    "udacity_advlane_test6.jpg": {
        "signs": [(14, 150, 250, 110), (1, 1170, 290, 90), (13, 700, 330, 48)],
        "others": [("black car", 810, 410, 945, 500), ("white car", 1010, 405, 1200, 500),
                   ("tree", 560, 250, 680, 370)],
    },
    "udacity_advlane_straight_lines2.jpg": {
        "signs": [(38, 1050, 320, 100), (25, 300, 330, 72)],
        "others": [("red car", 78, 398, 222, 478), ("fence", 1000, 330, 1150, 450), ("far car", 620, 400, 626, 406)],
    },
}


def _first_of_class(y: np.ndarray, c: int) -> int:
    return int(np.flatnonzero(y == c)[0])


def _detection(n: int, box: tuple[float, float, float, float], truth: str) -> dict:
    x0, y0, x1, y1 = box
    return {"id": str(n), "bbox": {"center": {"position": {"x": (x0 + x1) / 2, "y": (y0 + y1) / 2}, "theta": 0.0},
                                   "size_x": x1 - x0, "size_y": y1 - y0},
            "results": [{"hypothesis": {"class_id": "traffic sign", "score": 0.5}}], "truth": truth}


def build(out: Path, data_dir: str | None = None) -> list[dict]:
    """Write the frames and ``detections.jsonl`` under ``out``; returns the JSON lines."""
    root = data_root(data_dir)
    test = load_data("gtsrb:test", data_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines, n = [], 0
    for name, scene in SCENES.items():
        assert name in HELD_OUT, f"{name} must be a frame the no-sign class did not train on"
        frame = Image.open(root / "frames" / name).convert("RGB")
        dets = []
        for c, x, y, side in scene["signs"]:
            i = _first_of_class(test.y, c)
            frame.paste(Image.fromarray(test.x[i]).resize((side, side), Image.BILINEAR), (x, y))
            dets.append(_detection(n, (x, y, x + side, y + side), test.classes[c]) | {"gtsrb_test_index": i})
            n += 1
        for _, *box in scene["others"]:
            dets.append(_detection(n, tuple(box), NO_SIGN))
            n += 1
        frame.save(out / name, quality=92)
        lines.append({"frame": name, "detections": dets})
    (out / "detections.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


cli = typer.Typer(add_completion=False)


@cli.command()
def main(out: Path = typer.Option(Path("certinfer/data/examples/roadside"), help="Output folder"),
         data_dir: Optional[str] = typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]"),
         ) -> None:
    """Rebuild the packaged detector example."""
    lines = build(out, data_dir)
    typer.echo(f"{out}: {len(lines)} frames, {sum(len(x['detections']) for x in lines)} boxes")


if __name__ == "__main__":
    cli()
