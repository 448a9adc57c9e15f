"""``certinfer bench soundness``: patch attacks on a bundle's certified frames; flips must be zero (randomized
cropping: within the 1 - threshold budget of its probabilistic certificate).

Every location of every threat rectangle, with random, solid, copied-from-another-image and PGD contents
(PGD on the torch model from the checkpoint, transferred to the bundle's engine). The engine decides.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from certinfer.bench.attacks import (copied_contents, count_flips, locations, pgd_contents, random_contents,
                                     solid_contents)
from certinfer.bench.bundles import load_certifier, resolve
from certinfer.provenance import git_commit
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.certifier import Certifier
from certinfer.runtime.defenses import DefenseError, defense
from certinfer.train import data as datasets


Objective = Callable[[torch.Tensor], torch.Tensor]
# (label, rect, locations) -> a differentiable per-sample objective on a (L, C, H, W) batch of patched inputs
Surrogate = Callable[[int, tuple[int, int], np.ndarray], Objective]
Labels = Callable[[np.ndarray], np.ndarray]  # prepared (N, C, H, W) frames -> the label each would get
ENGINE = "onnxruntime-cpu"  # the attacked bundles run where their certificates hold (bit-exact, fp32)
ALERT = -2  # a patched frame the detector flagged


def vote_gap_objective(scorer: torch.nn.Module, label: int) -> Objective:
    """BagCert: the rival with most soft votes minus the certified label's soft votes."""
    def objective(adv: torch.Tensor) -> torch.Tensor:
        votes = torch.sigmoid(4 * scorer(adv)).mean(dim=(2, 3))
        return _rival_gap(votes, label)
    return objective


def _rival_gap(evidence: torch.Tensor, label: int) -> torch.Tensor:
    rival = evidence.clone()
    rival[:, label] = -torch.inf
    return rival.max(dim=1).values - evidence[:, label]


def local_logits_objective(model: torch.nn.Module, label: int) -> Objective:
    """PatchGuard on local logits: the best rival's clipped evidence minus the label's."""
    return lambda adv: _rival_gap(torch.relu(model(adv)).sum(dim=(2, 3)), label)


def ablation_objective(model: torch.nn.Module, geometry, rect: tuple[int, int], locs: np.ndarray,
                       label: int) -> Objective:
    """PatchGuard on ablations: rival minus label confidence, summed over the ablations each patch reaches.

    ``adv`` is in the certifier's prepared layout (image in [0, 1]); only the bands or blocks that meet a patch
    can change, so only those go through the base classifier.
    """
    from certinfer.runtime import ablation

    masks = torch.from_numpy(np.array(ablation.masks(geometry)))
    width = geometry.output_hw[1]
    reached = []
    for top, left in locs:
        (r0, r1), (c0, c1) = geometry.affected(rect, (int(top), int(left)))
        reached.append([i * width + j for i in range(r0, r1) for j in range(c0, c1)])
    k = max(len(r) for r in reached)
    idx = torch.tensor([r + r[:1] * (k - len(r)) for r in reached])  # pad by repeating (counted once more: harmless)

    def objective(adv: torch.Tensor) -> torch.Tensor:
        keep = masks[idx][:, :, None]  # (L, k, 1, H, W)
        inp = torch.cat([adv[:, None].expand(-1, k, -1, -1, -1), keep], dim=2).flatten(0, 1)
        conf = torch.softmax(model(inp), dim=1).view(len(adv), k, -1).sum(dim=1)
        return _rival_gap(conf, label)
    return objective


def crop_vote_objective(model: torch.nn.Module, input_hw: tuple[int, int], crop_hw: tuple[int, int],
                        rect: tuple[int, int], locs: np.ndarray, label: int, per_location: int = 16,
                        seed: int = 0) -> Objective:
    """Randomized cropping: rival minus label soft votes over crops that overlap each patch.

    The attacker does not know the runtime's crops, so it attacks ``per_location`` crop locations drawn among those
    overlapping the patch (fixed per location, from its own seed).
    """
    from certinfer.runtime.defenses.cropping import cut

    rng = np.random.default_rng(seed)
    (h, w), (ch, cw) = input_hw, crop_hw
    width = w - cw + 1
    tops = np.stack([rng.integers(max(0, t - ch + 1), min(t + rect[0], h - ch + 1), per_location) for t, _ in locs])
    lefts = np.stack([rng.integers(max(0, s - cw + 1), min(s + rect[1], width), per_location) for _, s in locs])
    planes = torch.from_numpy(cut(np.zeros((len(locs), 3, h, w), np.float32), crop_hw, tops * width + lefts)[:, 3:])
    rows = torch.from_numpy(tops)[:, :, None, None] + torch.arange(ch)[None, None, :, None]
    cols = torch.from_numpy(lefts)[:, :, None, None] + torch.arange(cw)[None, None, None, :]
    frames = torch.arange(len(locs))[:, None, None, None]

    def objective(adv: torch.Tensor) -> torch.Tensor:
        crops = adv[frames, :, rows, cols]  # (L, k, ch, cw, 3)
        inp = torch.cat([crops.permute(0, 1, 4, 2, 3).flatten(0, 1), planes], dim=1)
        conf = torch.softmax(model(inp), dim=1).view(len(adv), per_location, -1).sum(dim=1)
        return _rival_gap(conf, label)
    return objective


def masked_copies_objective(head: torch.nn.Module, front: torch.nn.Module, masks: np.ndarray, value: np.ndarray,
                            regions: list[tuple[tuple[int, int], tuple[int, int]]], label: int, per_location: int = 4,
                            seed: int = 0) -> Objective:
    """Double masking: rival minus label confidence over one-mask copies that leave each patch in view.

    ``front`` maps the attacker's input to the masked space (identity for pixel masks, the split network's front
    for feature masks); ``head`` maps a masked copy to logits. Per location, ``per_location`` masks (fixed, from
    ``seed``) among those disjoint from the patch's ``region`` ((r0, r1), (c0, c1) in the masked space; all
    masks where none is): the copies the patch can move, which is how it makes the first round disagree.
    """
    rng = np.random.default_rng(seed)
    picks = []
    for (r0, r1), (c0, c1) in regions:
        clear = np.flatnonzero(~masks[:, r0:r1, c0:c1].any(axis=(1, 2)))
        picks.append(rng.choice(clear if len(clear) else np.arange(len(masks)), per_location))
    hide = torch.from_numpy(masks[np.stack(picks)])[:, :, None]  # (L, k, 1, H', W')
    fill = torch.from_numpy(value.reshape(1, 1, -1, 1, 1) if value.ndim else value)

    def objective(adv: torch.Tensor) -> torch.Tensor:
        copies = torch.where(hide, fill, front(adv)[:, None])
        conf = torch.softmax(head(copies.flatten(0, 1)), dim=1).view(len(adv), per_location, -1).sum(dim=1)
        return _rival_gap(conf, label)
    return objective


def decided_labels(cert: Certifier) -> Labels:
    """The certifier's own labels for prepared frames; an alert (a detection defense such as ScaleCert) is the
    certificate holding, never a flip: it reads as :data:`ALERT`, which :func:`attack_certified` counts as none."""
    return lambda batch: np.array([ALERT if d.status == "alert" else d.label for d in cert.certify(cert.infer(batch))])


def attack_certified(cert: Certifier, surrogate: Surrogate, frames: np.ndarray, images: int, pgd_steps: int,
                     seed: int = 0, chunk: int = 512, labels: Labels | None = None) -> dict:
    """Attack the first ``images`` certified frames at every location of every threat rectangle.

    Contents: random, solid, copied from a frame the certifier labels differently, and PGD on the torch
    surrogate (transferred to the engine). ``labels`` (default: the certifier's own decisions) judges every
    patched frame; returns the flips of certified labels per content kind.
    """
    rng = np.random.default_rng(seed)
    x_all = cert.prepare(frames)
    verdicts = cert(frames)
    chosen = [i for i, v in enumerate(verdicts) if v.status == "certified"][:images]
    lo, hi = x_all.min(axis=(0, 2, 3)), x_all.max(axis=(0, 2, 3))
    labels = labels or decided_labels(cert)

    def decide(batch: np.ndarray, label: int) -> np.ndarray:
        found = labels(batch)
        return np.where(found == ALERT, label, found)

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
                            "pgd": pgd_contents(surrogate(label, rect, locs), x, rect, locs, lo, hi, steps=pgd_steps)}
                for kind, c in contents.items():
                    flips[kind] += count_flips(lambda b: decide(b, label), x, label, rect, locs, c, chunk=chunk)
                    evaluated += len(locs)
    return {"threat": str(cert.threat), "certified_frames_attacked": len(chosen), "patched_frames_evaluated": evaluated,
            "pgd_steps": pgd_steps, "flips": flips, "total_flips": sum(flips.values()),
            "seconds": time.perf_counter() - t0, "commit": git_commit(), "backend": cert.engine.name}


def bagcert_soundness(bundle: Path, checkpoint: Path, data: str, images: int, threat: str, pgd_steps: int,
                      seed: int = 0) -> dict:
    from certinfer.export.bagcert import load_scorer

    cert = load_certifier(bundle, ENGINE, threat)
    scorer, _ = load_scorer(checkpoint)
    report = attack_certified(cert, lambda label, rect, locs: vote_gap_objective(scorer, label),
                              datasets.load(data).x[:2000], images, pgd_steps, seed)
    return {"defense": "bagcert", "bundle": str(bundle), "data": data, **report}


def masking_soundness(bundle: Path, checkpoint: Path, data: str, images: int, threat: str, pgd_steps: int,
                      seed: int = 0) -> dict:
    """PatchGuard bundles: local-logit (Mask-BN, CBN) or ablation (Mask-DS, DRS) per the bundle's params."""
    from certinfer.export.masking import load_network

    cert = load_certifier(bundle, ENGINE, threat)
    model, _, _ = load_network(checkpoint)
    model.eval()
    if cert.source == "local-logits":
        def surrogate(label, rect, locs):
            return local_logits_objective(model, label)
        chunk = 512
    else:
        def surrogate(label, rect, locs):
            return ablation_objective(model, cert.geometry, rect, locs, label)
        chunk = 16  # each patched frame becomes one engine input per ablation
    report = attack_certified(cert, surrogate, datasets.load(data).x[:2000], images, pgd_steps, seed, chunk)
    params = cert.manifest["defense"]["params"]
    return {"defense": "masking", "params": params, "bundle": str(bundle), "data": data, **report}


def cropping_soundness(bundle: Path, checkpoint: Path, data: str, images: int, threat: str, pgd_steps: int,
                       seed: int = 0, crop_seed: int | None = None) -> dict:
    """Randomized cropping. Sampled bundles: each patched frame gets fresh crops, from ``crop_seed`` (hidden from
    the attacker; None: the OS's entropy); certified labels may flip with probability up to 1 - threshold, so
    ``budget`` is (1 - threshold) x the patched frames. Exhaustive bundles are deterministic: the budget is 0."""
    from certinfer.export.cropping import load_network

    cert = load_certifier(bundle, ENGINE, threat)
    if crop_seed is not None:
        cert = cert.seeded(crop_seed)
    model, _, _ = load_network(checkpoint)

    def surrogate(label, rect, locs):
        return crop_vote_objective(model, cert.input_hw, cert.crop_hw, rect, locs, label, seed=seed)

    o = cert.options
    crops = cert.locations if o.exhaustive else o.crops
    report = attack_certified(cert, surrogate, datasets.load(data).x[:2000], images, pgd_steps, seed,
                              chunk=max(1, 65536 // crops))
    budget = 0.0 if o.exhaustive else (1 - o.threshold) * report["patched_frames_evaluated"]
    return {"defense": "cropping", "params": cert.manifest["defense"]["params"], "bundle": str(bundle), "data": data,
            "budget": budget, **report}


def doublemask_surrogate(cert: Certifier, net: torch.nn.Module, seed: int = 0) -> Surrogate:
    """Double masking's PGD objectives through the checkpoint's classifier ``net``: in the bundle's masked space
    (pixels, or the feature map of ``net``'s front at the bundle's split), on the one-mask copies that show the
    patch (:func:`masked_copies_objective`)."""
    from certinfer.train.models.doublemask import Back, Front

    for p in net.parameters():
        p.requires_grad_(False)
    if cert.space == "feature":
        split = int(cert.params["split"])
        front, head = Front(net, split), Back(net, split)
    else:
        front, head = torch.nn.Identity(), net

    def region(rect: tuple[int, int], loc: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
        """Where a patch at ``loc`` lies in the masked space: its pixels, or the feature cells it reaches."""
        top, left = int(loc[0]), int(loc[1])
        if cert.geometry is not None:
            return cert.geometry.affected(rect, (top, left))
        return (top, top + rect[0]), (left, left + rect[1])

    def surrogate(label: int, rect: tuple[int, int], locs: np.ndarray) -> Objective:
        return masked_copies_objective(head, front, cert.masks, cert.mask_value, [region(rect, loc) for loc in locs],
                                       label, seed=seed)
    return surrogate


def doublemask_soundness(bundle: Path, checkpoint: Path, data: str, images: int, threat: str, pgd_steps: int,
                         seed: int = 0) -> dict:
    """Double masking (pixel or feature space): PGD pushes the one-mask copies that show the patch to the best
    rival (:func:`doublemask_surrogate`); every patched frame is judged by the runtime's double-masking inference
    label."""
    from certinfer.export.doublemask import load_classifier

    cert = load_certifier(bundle, ENGINE, threat)
    net, _ = load_classifier(checkpoint)
    k = len(cert.masks)
    report = attack_certified(cert, doublemask_surrogate(cert, net, seed), datasets.load(data).x[:2000], images,
                              pgd_steps, seed, chunk=max(1, 8192 // (k + k * (k - 1) // 2)))  # rows per frame
    return {"defense": "doublemask", "params": cert.manifest["defense"]["params"], "bundle": str(bundle),
            "data": data, **report}


def scalecert_soundness(bundle: Path, checkpoint: Path, data: str, images: int, threat: str, pgd_steps: int,
                        seed: int = 0) -> dict:
    """ScaleCert (certified detection): a certified frame's label may only stay or turn into an alert. PGD pushes
    the unoccluded frame's prediction (Algorithm 1's label) to the best rival through the SIN network."""
    from certinfer.export.scalecert import load_network

    cert = load_certifier(bundle, ENGINE, threat)
    model, _, _ = load_network(checkpoint)

    def surrogate(label, rect, locs):
        def objective(adv: torch.Tensor) -> torch.Tensor:
            logits, _ = model(torch.cat([adv, torch.zeros_like(adv[:, :1])], dim=1))
            return _rival_gap(logits, label)
        return objective

    report = attack_certified(cert, surrogate, datasets.load(data).x[:2000], images, pgd_steps, seed, chunk=64)
    return {"defense": "scalecert", "params": cert.manifest["defense"]["params"], "bundle": str(bundle), "data": data,
            **report}


def ibp_soundness(bundle: Path, checkpoint: Path, data: str, images: int, threat: str, pgd_steps: int,
                  seed: int = 0) -> dict:
    """IBP: PGD pushes the best rival's logit above the label's on the torch network the bundle was exported from."""
    from certinfer.export.ibp import load_network

    cert = load_certifier(bundle, ENGINE, threat)
    net, _, _ = load_network(checkpoint)
    report = attack_certified(cert, lambda label, rect, locs: (lambda adv: _rival_gap(net(adv), label)),
                              datasets.load(data).x[:2000], images, pgd_steps, seed,
                              labels=lambda batch: cert.logits(batch).argmax(axis=1))  # a label needs no bounds
    return {"defense": "ibp", "params": cert.manifest["defense"]["params"], "bundle": str(bundle), "data": data,
            **report}


cli = typer.Typer(add_completion=False)


@cli.command("soundness")
def soundness_command(
    checkpoint: Path = typer.Option(..., help="The torch checkpoint the bundle was exported from (for PGD)"),
    bundle: Optional[str] = typer.Option(None, help="Bundle folder, .tar or packaged name [default: default]"),
    data: str = typer.Option("gtsrb:test", help="Frames to attack (the first certified ones)"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir",
        help="Data folder with gtsrb/ and cifar10/ [default: $CERTINFER_DATA, else shared/data here or above]"),
    images: int = typer.Option(20, min=1, help="Certified frames to attack"),
    threat: str = typer.Option("5x5,2x12,12x2", help="Rectangles to attack at every location"),
    pgd_steps: int = typer.Option(10, min=1),
    out: Optional[Path] = typer.Option(None, help="Report JSON [default: bench/results/soundness-DEFENSE.json]"),
) -> None:
    """Attack certified frames at every patch location; exit 1 if any certified label flips (beyond a
    probabilistic certificate's budget)."""
    torch.set_num_threads(1)
    if data_dir is not None:  # every defense's attack reads --data from the data root
        os.environ["CERTINFER_DATA"] = str(data_dir)
    bundle = resolve(bundle)
    kind = load_bundle(bundle).manifest["defense"]["kind"]
    try:
        attack = defense(kind).load("surrogate")
    except DefenseError as e:
        raise typer.BadParameter(f"no soundness attack for defense {kind!r}: {e}") from None
    report = attack(bundle, checkpoint, data, images, threat, pgd_steps)
    out = out or Path("bench/results") / f"soundness-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report))
    if report["total_flips"] > report.get("budget", 0):
        raise typer.Exit(1)
