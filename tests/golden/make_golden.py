"""Write the golden certificates: tiny bundles, fixed frames and the verdicts the CURRENT code gives on them.

    python tests/golden/make_golden.py

Run once, before the Certifier refactor, with the code as it was then (needs the ``train`` extra: torch). It
trains a tiny model per defense on a synthetic 4-class image folder (a few seconds each), exports each one with
the project's own exporter (``certinfer.export.*.export_*``: parity, locality probe, ``probe.exact_backends``,
IBP's ``verified_backends``, ``bundle_writer.write_bundle``), then records what
``certinfer.load(path, backend="onnxruntime-cpu")(frames)`` returns. ``test_golden.py`` compares the refactored
code against ``expected.json``; it never needs this script or torch.

Outputs, beside this file: ``bundles/<name>/`` (one bundle each), ``frames.npz`` (uint8 frame batches, one array
per frame size, called in the order of ``expected.json``'s ``frame_groups``) and ``expected.json``.

Seeding: the sample-mode cropping bundle draws its crops from ``fix_seed(CROP_SEED)`` (called once, right after
loading, before the first batch). The refactored code's equivalent is a certifier seeded with the same seed.
Variants (``"<bundle>:<variant>"``) re-decide the same engine outputs through the current keyword paths:
``decide(..., condition="3.3")`` (BagCert) and ``decide(..., aggregation=...)`` (masking).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
BUNDLES, FRAMES, EXPECTED = HERE / "bundles", HERE / "frames.npz", HERE / "expected.json"
BACKEND = "onnxruntime-cpu"
CROP_SEED = 7
HW = (16, 16)  # masking, IBP and ScaleCert
CROP_INPUT_HW = (24, 24)  # the crop classifier needs crops of at least 8x8: a 24x24 input has 17x17 locations
# export_bagcert loads its image-folder test set at the loader's default 32x32 whatever the model's input, so the
# BagCert model takes 32x32 (a 16x16 one fails its export-time probe on 32x32 images).
BAGCERT_HW = (32, 32)
COLORS = {"0-red": (200, 40, 40), "1-green": (40, 170, 40), "2-blue": (40, 60, 200), "3-yellow": (210, 200, 40)}
DATA = "golden-data"  # relative to the temporary working folder: bundles' provenance names no machine path

# Tiny networks (the end-to-end tests' settings, narrower where that keeps a bundle small).
BAGNET = dict(kernels=(3, 1, 1, 1), strides=(1, 2, 1, 1), widths=(8, 16, 16, 16), stem_width=8)
DRS = dict(widths=(8, 8, 16), blocks=(1, 1, 1), strides=(1, 2, 2), stem_width=8)
CROPNET = dict(widths=(8, 8, 16, 16), crop_hw=(8, 8))
IBP = {"convs": [[4, 4, 2, 1], [8, 4, 2, 1]], "fcs": [32], "arch": "golden-tiny"}
SIN = dict(stem=8, widths=(8, 16), strides=(2, 2), blocks=(1, 1), top_k=0.1)

# bundle name -> threat (chosen so that each bundle has certified and uncertified frames)
THREATS = {"bagcert": "2x2,6x6", "masking-bn": "2x2,4x4", "masking-ds": "1x1,2x2", "cropping-sample": "1x1,2x2",
           "cropping-exhaustive": "1x1,2x2", "ibp": "1x1,2x2", "scalecert": "2x8,4x4"}


# --- synthetic data and frames ------------------------------------------------------------------------------

def sign(rng: np.random.Generator, color: tuple[int, int, int], hw: tuple[int, int], share: float = 0.7,
         contrast: float = 1.0) -> np.ndarray:
    """A gray noisy background with one coloured rectangle covering about ``share`` of each side."""
    h, w = hw
    img = rng.normal(128, 18, size=(h, w, 3))
    rh, rw = max(2, round(h * share * rng.uniform(0.8, 1.1))), max(2, round(w * share * rng.uniform(0.8, 1.1)))
    top, left = rng.integers(0, h - min(rh, h) + 1), rng.integers(0, w - min(rw, w) + 1)
    fill = 128 + contrast * (np.asarray(color, float) - 128)
    img[top:top + rh, left:left + rw] = fill + rng.normal(0, 12, size=img[top:top + rh, left:left + rw].shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(root: Path, per_class: dict[str, int], seed: int = 0) -> None:
    """``root/{train,test}/<class>/<n>.png``: 24x24 synthetic signs (the loaders resize them to the model input)."""
    rng = np.random.default_rng(seed)
    for part, n in per_class.items():
        for name, color in COLORS.items():
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(sign(rng, color, (24, 24))).save(folder / f"{i:03d}.png")


def golden_frames(seed: int = 123) -> dict[str, np.ndarray]:
    """12 frames in four batches: each model's input size (16, 24, 32) and a size no model has (13x20)."""
    rng = np.random.default_rng(seed)
    c = list(COLORS.values())
    noise = rng.integers(0, 256, size=(*HW, 3), dtype=np.uint8)
    left_right = np.concatenate([sign(rng, c[0], HW, 1.0)[:, :8], sign(rng, c[1], HW, 1.0)[:, 8:]], axis=1)
    patched = sign(rng, c[0], (24, 24), 0.9)
    patched[8:16, 8:16] = c[1]  # an 8x8 green square on a red sign
    top_bottom = np.concatenate([sign(rng, c[2], (7, 20), 1.0), sign(rng, c[3], (6, 20), 1.0)], axis=0)
    return {"16x16": np.stack([sign(rng, c[0], HW), sign(rng, c[1], HW), sign(rng, c[3], HW), left_right, noise]),
            "24x24": np.stack([sign(rng, c[2], (24, 24)), patched]),
            "32x32": np.stack([sign(rng, c[3], (32, 32), 0.9), sign(rng, c[2], (32, 32), 0.6, 0.35)]),
            "13x20": np.stack([sign(rng, c[2], (13, 20), 0.8), top_bottom, sign(rng, c[1], (13, 20), 0.7, 0.6)])}


# --- training and export with the project's own code ----------------------------------------------------------

def train_all(work: Path) -> dict[str, Path]:
    """Train each tiny network (seed 0, CPU); returns network name -> checkpoint."""
    from certinfer.train import bagcert, cropping, ibp, patchguard, scalecert

    data = f"folder:{DATA}"
    runs = {name: work / "runs" / name for name in ("bagcert", "bagnet", "drs", "cropnet", "ibp", "sin")}
    bagcert.train(bagcert.TrainConfig(dataset=data, model=dict(BAGNET), input_hw=BAGCERT_HW, epochs=12, batch_size=32,
                                      margin=0.4, sigma=0.0, bf16=False, warmup_epochs=0.5, crop_pad=1,
                                      eval_threat="2x2"), runs["bagcert"], device="cpu")
    for network, model in (("bagnet", BAGNET), ("drs", DRS)):
        patchguard.train(patchguard.TrainConfig(network=network, dataset=data, model=dict(model), input_hw=HW,
                                                epochs=20, batch_size=32, bf16=False, warmup_epochs=0.5, crop_pad=1,
                                                eval_threat="2x2", eval_every=100), runs[network], device="cpu")
    cropping.train(cropping.TrainConfig(dataset=data, model=dict(CROPNET), input_hw=CROP_INPUT_HW, epochs=6,
                                        batch_size=32, lr=3e-3, warmup_epochs=0.5, eval_every=100, eval_crops=16,
                                        eval_threat="2x2"), runs["cropnet"], device="cpu")
    ibp.train(ibp.TrainConfig(dataset=data, input_hw=HW, model=dict(IBP), patch=2, k=4, epochs=20, batch_size=32,
                              ramp_start=2.0, ramp_epochs=8.0, lr_decay_every=6, eval_images=40, val_images=8,
                              eval_every=100), runs["ibp"], device="cpu")
    scalecert.train(scalecert.TrainConfig(dataset=data, model=dict(SIN), input_hw=HW, epochs=8, dense_epochs=2,
                                          batch_size=32, lr=4e-3, warmup_epochs=0.5, crop_pad=1, occlusion_threat="2x2",
                                          occlude=0.7, eval_every=100, eval_images=40), runs["sin"], device="cpu")
    return {name: run / "model.safetensors" for name, run in runs.items()}


def export_all(ckpt: dict[str, Path], out: Path) -> None:
    """Every golden bundle, written by the current exporters."""
    from certinfer.export.bagcert import export_bagcert
    from certinfer.export.cropping import export_cropping
    from certinfer.export.ibp import export_ibp
    from certinfer.export.patchguard import export_patchguard
    from certinfer.export.scalecert import export_scalecert

    t = THREATS
    export_bagcert(ckpt["bagcert"], out / "bagcert", threat=t["bagcert"], probe_trials=32, max_batch=256)
    export_patchguard(ckpt["bagnet"], out / "masking-bn", variant="mask-bn", threat=t["masking-bn"], probe_trials=32,
                      max_batch=256)
    export_patchguard(ckpt["drs"], out / "masking-ds", variant="mask-ds", threat=t["masking-ds"], probe_trials=32,
                      max_batch=256)
    for mode in ("sample", "exhaustive"):
        name = f"cropping-{mode}"
        export_cropping(ckpt["cropnet"], out / name, threat=t[name], crops=48, mode=mode, max_batch=1024,
                        eval_limit=40)
    export_ibp(ckpt["ibp"], out / "ibp", threat=t["ibp"], max_batch=1024, eval_limit=40)
    export_scalecert(ckpt["sin"], out / "scalecert", threat=t["scalecert"], probe_trials=32, max_batch=1024,
                     eval_limit=40)


# --- the verdicts of the current code ---------------------------------------------------------------------------

def record(label: int, status: str, certificate, reason: str) -> dict:
    """One frame's verdict as stored: label, status, kind, certified, per_rect {key: [certified, margin]}, p."""
    return {"label": int(label), "status": status, "kind": certificate.kind, "certified": bool(certificate.certified),
            "per_rect": {k: [bool(r.certified), float(r.margin)] for k, r in certificate.per_rect.items()},
            "p": None if certificate.p is None else float(certificate.p), "reason_empty": not reason}


def _variant_kwargs(variant: str) -> dict:
    """The keyword arguments of the current ``decide`` that select a variant: BagCert's Condition "3.3", or a
    masking aggregation named in ``masking.VARIANTS`` (any aggregation applies to either masking source)."""
    from certinfer.runtime.defenses.masking import VARIANTS, Aggregation

    return {"condition": variant} if variant == "3.3" else {"aggregation": Aggregation.from_params(VARIANTS[variant])}


# Together the masking variants cover the three features (logits with tanh clipping, confidence, one-hot votes).
VARIANT_OF = {"bagcert": ["3.3"], "masking-bn": ["cbn", "mask-ds"], "masking-ds": ["drs"]}


def run_plain(certifier, frames: np.ndarray) -> list[dict]:
    return [record(v.label, v.status, v.certificate, v.reason) for v in certifier(frames)]


def run_variant(certifier, variant: str) -> Callable[[np.ndarray], list[dict]]:
    """The same engine call, decided with the variant's keyword (current API: prepare, run_engine, decide)."""
    kwargs = _variant_kwargs(variant)

    def run(frames: np.ndarray) -> list[dict]:
        x = certifier.prepare(frames)
        decisions = certifier.decide(x, certifier.run_engine(x), **kwargs)
        return [record(d.label, d.status or ("certified" if d.certificate.certified else "uncertified"),
                       d.certificate, d.reason) for d in decisions]

    return run


def load(name: str, bundles: Path):
    import certinfer

    certifier = certinfer.load(bundles / name, backend=BACKEND)
    if getattr(certifier, "mode", None) == "sample":
        certifier.fix_seed(CROP_SEED)  # the refactored code: a certifier seeded with CROP_SEED
    return certifier


def expected(frames: dict[str, np.ndarray], bundles: Path) -> dict[str, list[dict]]:
    """bundle or "bundle:variant" -> one record per frame, batches in ``frames`` order."""
    results = {}
    for name in sorted(p.name for p in bundles.iterdir() if p.is_dir()):
        certifier = load(name, bundles)
        results[name] = [r for batch in frames.values() for r in run_plain(certifier, batch)]
        for variant in VARIANT_OF.get(name, []):
            run = run_variant(load(name, bundles), variant)
            results[f"{name}:{variant}"] = [r for batch in frames.values() for r in run(batch)]
    return results


def summary(results: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    return {name: {s: sum(r["status"] == s for r in rows) for s in ("certified", "uncertified", "alert")}
            for name, rows in results.items()}


def main() -> None:
    import torch

    torch.manual_seed(0)
    frames = golden_frames()
    with tempfile.TemporaryDirectory(prefix="certinfer-golden-") as tmp, contextlib.chdir(tmp):
        work = Path(tmp)
        write_dataset(work / DATA, {"train": 40, "test": 10})
        ckpt = train_all(work)
        staged = work / "bundles"
        export_all(ckpt, staged)
        results = expected(frames, staged)
        if BUNDLES.exists():
            shutil.rmtree(BUNDLES)
        shutil.copytree(staged, BUNDLES)
    np.savez_compressed(FRAMES, **frames)
    doc = {"about": "verdicts of certinfer.load(bundle, backend='onnxruntime-cpu')(batch) for each frames.npz "
                    "batch in frame_groups order; written by make_golden.py before the Certifier refactor",
           "backend": BACKEND, "crop_seed": CROP_SEED, "frame_groups": list(frames), "threats": THREATS,
           "summary": summary(results), "results": results}
    EXPECTED.write_text(json.dumps(doc, indent=1) + "\n")
    json.dump(doc["summary"], sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
