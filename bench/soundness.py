"""``certinfer bench soundness``: patch attacks on a shipped model's certified frames; flips must be zero.

Every location of every threat rectangle, with random, solid, copied-from-another-image and PGD contents
(PGD on the torch model from the checkpoint, transferred to the bundle's engine). The engine decides.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

import certinfer
from certinfer.bench.attacks import (copied_contents, count_flips, locations, pgd_contents, random_contents,
                                     solid_contents)
from certinfer.provenance import git_commit
from certinfer.train import data as datasets


def vote_gap_objective(scorer: torch.nn.Module, label: int):
    """The rival with most soft votes minus the certified label's soft votes."""
    def objective(adv: torch.Tensor) -> torch.Tensor:
        votes = torch.sigmoid(4 * scorer(adv)).mean(dim=(2, 3))
        rival = votes.clone()
        rival[:, label] = -1
        return rival.max(dim=1).values - votes[:, label]
    return objective


def bagcert_soundness(bundle: Path, checkpoint: Path, data: str, images: int, threat: str, pgd_steps: int,
                      seed: int = 0) -> dict:
    from certinfer.export.bagcert import load_scorer

    cert = certinfer.load(bundle, backend="onnxruntime-cpu", threat=threat)
    scorer, _ = load_scorer(checkpoint)
    split = datasets.load(data)
    rng = np.random.default_rng(seed)
    x_all = cert.prepare(split.x[:2000])
    verdicts = cert(split.x[:2000])
    chosen = [i for i, v in enumerate(verdicts) if v.status == "certified"][:images]
    lo, hi = x_all.min(axis=(0, 2, 3)), x_all.max(axis=(0, 2, 3))

    def decide(batch: np.ndarray) -> np.ndarray:
        return np.array([d.label for d in cert.decide(batch, cert.run_engine(batch))])

    flips = {"random": 0, "solid": 0, "copied": 0, "pgd": 0}
    evaluated, t0 = 0, time.perf_counter()
    with typer.progressbar(chosen, label="attacking certified frames") as bar:
        for i in bar:
            label, x = verdicts[i].label, x_all[i]
            other = x_all[next(j for j, v in enumerate(verdicts) if v.label not in (label, -1))]
            for rect in cert.threat.rects:
                locs = locations(cert.input_hw, rect)
                contents = {"random": random_contents(rng, len(locs), 3, rect, lo, hi),
                            "solid": solid_contents(rng, len(locs), 3, rect, lo, hi),
                            "copied": copied_contents(other, rect, locs),
                            "pgd": pgd_contents(vote_gap_objective(scorer, label), x, rect, locs, lo, hi, steps=pgd_steps)}
                for kind, c in contents.items():
                    flips[kind] += count_flips(decide, x, label, rect, locs, c)
                    evaluated += len(locs)
    return {"defense": "bagcert", "bundle": str(bundle), "data": data, "threat": str(cert.threat),
            "certified_frames_attacked": len(chosen), "patched_frames_evaluated": evaluated,
            "pgd_steps": pgd_steps, "flips": flips, "total_flips": sum(flips.values()),
            "seconds": time.perf_counter() - t0, "commit": git_commit(), "backend": cert.engine.name}


cli = typer.Typer(add_completion=False)


@cli.command("soundness")
def soundness_command(
    checkpoint: Path = typer.Option(..., help="The torch checkpoint the bundle was exported from (for PGD)"),
    bundle: Optional[Path] = typer.Option(None, help="Bundle [default: the packaged default bundle]"),
    data: str = typer.Option("gtsrb:test", help="Frames to attack (the first certified ones)"),
    images: int = typer.Option(20, min=1, help="Certified frames to attack"),
    threat: str = typer.Option("5x5,2x12,12x2", help="Rectangles to attack at every location"),
    pgd_steps: int = typer.Option(10, min=1),
    out: Path = typer.Option(Path("bench/results/soundness-bagcert.json")),
) -> None:
    """Attack certified frames at every patch location; exit 1 if any certified label flips."""
    torch.set_num_threads(1)
    report = bagcert_soundness(bundle or certinfer.default_bundle(), checkpoint, data, images, threat, pgd_steps)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report))
    if report["total_flips"]:
        raise typer.Exit(1)
