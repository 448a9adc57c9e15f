"""Golden certificates: every defense must give the verdicts the code gave before the Certifier refactor.

``make_golden.py`` (run once, on the pre-refactor code) wrote the tiny bundles in ``bundles/``, the frames in
``frames.npz`` and the verdicts in ``expected.json``. The cropping bundles' manifests have since gained the
``probe`` section (onnxruntime CPU checked batch-independent) and ``tolerance`` the cropping export writes now;
without it the runtime counts near-tie crops as changed on every backend. Each case here loads a bundle with the public API
``certinfer.load(path, backend="onnxruntime-cpu")``, calls it on each frame batch (in ``frame_groups`` order) and
compares label, status, certificate kind, certified, every rectangle's [certified, margin], p, and whether a
reason was given. Needs onnxruntime only (no torch).

Two things have no public spelling before the refactor: a seeded cropping certifier and a decision variant
(BagCert's Condition 3.3, another masking aggregation). Both live in ``_seeded`` and ``_variant`` right below:
the refactor swaps those two functions for the new API and nothing else here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import certinfer
from certinfer import Verdict

HERE = Path(__file__).resolve().parents[1] / "golden"
EXPECTED = json.loads((HERE / "expected.json").read_text(encoding="utf-8"))
BACKEND = "onnxruntime-cpu"
MARGIN_RTOL = 1e-5
MARGIN_ATOL = 1e-6  # margins this close to 0 compare absolutely (float32 engine rounding)
P_ATOL = 1e-9

Run = Callable[[np.ndarray], list[Verdict]]


# --- the pre-refactor API: swap these two functions for the refactored API, nothing else ----------------------

def _seeded(certifier) -> Run:
    """The certifier drawing its crops from ``EXPECTED["crop_seed"]`` (called for sample-mode cropping only).

    Pre-refactor: ``CroppingCertifier.fix_seed(seed)``, called once after loading, before the first batch (the
    generator recorded all batches from that one random stream). Refactored: a certifier seeded with the same seed.
    """
    return certifier.seeded(EXPECTED["crop_seed"])


def _variant(certifier, name: str) -> Run:
    """A callable like ``certifier(frames)`` that decides with variant ``name``: ``"3.3"`` (BagCert's Condition
    3.3) or a key of ``masking.VARIANTS`` (``"cbn"``, ``"mask-ds"``, ``"drs"``: that aggregation of the features).

    Refactored: the certifier's copy with those options (``with_options``), called like the certifier.
    """
    import dataclasses

    from certinfer.runtime.defenses.masking import VARIANTS, MaskingOptions

    if name == "3.3":
        return certifier.with_options(condition=name)
    return certifier.with_options(**dataclasses.asdict(MaskingOptions.from_params(VARIANTS[name])))


# --- the comparison ---------------------------------------------------------------------------------------------

def _frames() -> list[np.ndarray]:
    with np.load(HERE / "frames.npz", allow_pickle=False) as d:
        return [d[key] for key in EXPECTED["frame_groups"]]


def _record(v: Verdict) -> dict:
    c = v.certificate
    return {"label": v.label, "status": v.status, "kind": c.kind, "certified": c.certified,
            "per_rect": {k: [r.certified, r.margin] for k, r in c.per_rect.items()}, "p": c.p,
            "reason_empty": not v.reason}


def _mismatches(got: dict, want: dict) -> list[str]:
    """What differs between one frame's verdict and its golden record (empty when they agree)."""
    bad = [f"{k}: {got[k]!r} != {want[k]!r}" for k in ("label", "status", "kind", "certified", "reason_empty")
           if got[k] != want[k]]
    if set(got["per_rect"]) != set(want["per_rect"]):
        return bad + [f"rects: {sorted(got['per_rect'])} != {sorted(want['per_rect'])}"]
    for key, (cert, margin) in want["per_rect"].items():
        g_cert, g_margin = got["per_rect"][key]
        if g_cert != cert or not math.isclose(g_margin, margin, rel_tol=MARGIN_RTOL, abs_tol=MARGIN_ATOL):
            bad.append(f"{key}: [{g_cert}, {g_margin!r}] != [{cert}, {margin!r}]")
    if (got["p"] is None) != (want["p"] is None) or (want["p"] is not None and abs(got["p"] - want["p"]) > P_ATOL):
        bad.append(f"p: {got['p']!r} != {want['p']!r}")
    return bad


def _draws_crops(bundle: str) -> bool:
    """Sample-mode cropping: random crops, so its case runs seeded (read from the stored manifest)."""
    defense = json.loads((HERE / "bundles" / bundle / "manifest.json").read_text(encoding="utf-8"))["defense"]
    return defense["kind"] == "cropping" and defense["params"].get("mode", "sample") == "sample"


def _runner(case: str) -> Run:
    bundle, _, variant = case.partition(":")
    certifier = certinfer.load(HERE / "bundles" / bundle, backend=BACKEND)
    run = _seeded(certifier) if _draws_crops(bundle) else certifier
    return _variant(run, variant) if variant else run


@pytest.mark.parametrize("case", sorted(EXPECTED["results"]))
def test_verdicts_match_the_golden_certificates(case: str) -> None:
    run = _runner(case)
    got = [_record(v) for batch in _frames() for v in run(batch)]
    want = EXPECTED["results"][case]
    assert len(got) == len(want)
    problems = [f"frame {i}: {'; '.join(bad)}" for i, (g, w) in enumerate(zip(got, want)) if (bad := _mismatches(g, w))]
    assert not problems, f"{case} differs from its golden verdicts:\n" + "\n".join(problems)


def test_every_bundle_has_golden_verdicts() -> None:
    bundles = sorted(p.name for p in (HERE / "bundles").iterdir() if p.is_dir())
    assert bundles and all(b in EXPECTED["results"] for b in bundles)
    assert {case.partition(":")[0] for case in EXPECTED["results"]} == set(bundles)
