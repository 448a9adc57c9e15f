"""``certinfer bench background``: how a bundle answers boxes that hold no sign, and signs.

A detector's false positive (a box on a car, a tree, the road) should be answered "no sign", and a real sign must
not be. On held-out material the training never saw (:mod:`certinfer.train.background`: crops of three held-out
dashcam frames and CIFAR-10 test images; the first GTSRB test images for signs) this reports:

* false sign: the share of no-sign images answered with a sign class (a bundle without a "no sign" class
  answers every one with a sign);
* alert: the share of no-sign images a detection defense (ScaleCert) answers with an alert, which names no sign;
* false "no sign": the share of sign images answered "no sign";
* certified "no sign": the share of no-sign images answered "no sign" with a certificate (no patch of the
  threat can make a sign appear there);
* clean and certified accuracy on the signs, overall and per GTSRB sign group.

Results: ``<out>/background-<bundle>.json`` and a bar plot beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from tqdm import tqdm

from certinfer.bench.groups import per_group
from certinfer.provenance import git_commit
from certinfer.runtime.loader import load
from certinfer.train import background as no_sign
from certinfer.train.data import data_root, load as load_data

CHUNK = 64


def answers(certifier, images: np.ndarray, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and statuses for uint8 images, in chunks with a progress bar."""
    labels, statuses = [], []
    for i in tqdm(range(0, len(images), CHUNK), desc=desc, leave=False):
        for v in certifier.certify_frames(images[i:i + CHUNK]):
            labels.append(v.label)
            statuses.append(v.status)
    return np.asarray(labels), np.asarray(statuses)


def rates(certifier, signs: np.ndarray, truth: np.ndarray, scenes: dict[str, np.ndarray]) -> dict:
    """The rates of the module docstring; ``scenes`` holds the no-sign images by source."""
    none = certifier.classes.index(no_sign.NAME) if no_sign.NAME in certifier.classes else -1
    labels, statuses = answers(certifier, signs, "signs")
    certified = statuses == "certified"
    out = {"signs": len(signs), "clean": float(np.mean(labels == truth)),
           "certified": float(np.mean((labels == truth) & certified)),
           "false_no_sign": float(np.mean(labels == none)), "sources": {},
           "sign_groups": per_group(truth, labels == truth, certified)}
    for source, images in scenes.items():
        labels, statuses = answers(certifier, images, source)
        alert = statuses == "alert"  # names no class
        out["sources"][source] = {"images": len(images), "false_sign": float(np.mean((labels != none) & ~alert)),
                                  "alert": float(np.mean(alert)),
                                  "certified_no_sign": float(np.mean((labels == none) & (statuses == "certified")))}
    every = [s for s in out["sources"].values()]
    n = sum(s["images"] for s in every)
    for key in ("false_sign", "alert", "certified_no_sign"):
        out[key] = sum(s[key] * s["images"] for s in every) / n
    return out


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["false sign", 'certified "no sign"', 'false "no sign"', "clean (signs)", "certified (signs)"]
    values = [result[k] for k in ("false_sign", "certified_no_sign", "false_no_sign", "clean", "certified")]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bars = ax.barh(names[::-1], [100 * v for v in values[::-1]], color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f%%", padding=3)
    ax.set_xlim(0, 110)
    ax.set_xlabel("% of images")
    ax.set_title(f"{result['bundle']}: boxes without a sign ({result['background_images']} held out) "
                 f"and {result['signs']} GTSRB test signs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


cli = typer.Typer(add_completion=False)


@cli.command("background")
def background_command(
    bundle: str = typer.Option("default", "--bundle", "-b", help="Bundle folder, .tar or packaged name"),
    signs: int = typer.Option(500, help="The first this many GTSRB test images"),
    scenes: int = typer.Option(1000, help="Held-out no-sign images: half dashcam crops, half CIFAR-10 test"),
    seed: int = typer.Option(0, help="Seed of the held-out crops and draws"),
    data_dir: Optional[str] = typer.Option(None, help="Data folder [default: $CERTINFER_DATA or ../shared/data]"),
    out: Path = typer.Option(Path("bench/results"), help="Folder for the JSON and the plot"),
) -> None:
    """False-sign and false "no sign" rates of a bundle on held-out material."""
    certifier = load(bundle)
    test = load_data("gtsrb:test", data_dir)
    root = data_root(data_dir)
    rng = np.random.default_rng([seed, 1])
    held = {"dashcam (3 held-out frames)": no_sign.dashcam_crops(root, scenes // 2, rng, held_out=True),
            "CIFAR-10 test (JPEG copy)": no_sign.cifar_images(root, scenes - scenes // 2, rng, "test")}
    result = {"bundle": bundle, "classes": len(certifier.classes), "threat": str(certifier.threat),
              "background_images": scenes, "data": "gtsrb:test", "commit": git_commit(),
              **rates(certifier, test.x[:signs], test.y[:signs], held)}
    out.mkdir(parents=True, exist_ok=True)
    name = Path(bundle).name
    (out / f"background-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"background-{name}.png")
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "sources"}))
