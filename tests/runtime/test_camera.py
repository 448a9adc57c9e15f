"""Camera-pixel threats: the bilinear footprint against brute force, the mapping per box, and an attack in
camera pixels at every location on certified boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import certinfer
from certinfer.runtime import camera, regions
from certinfer.threat import ThreatError, parse


def _resize_rows(rows: np.ndarray, dst: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rows).resize((dst, rows.shape[0]), Image.BILINEAR))


@pytest.mark.parametrize("seed", range(6))
def test_footprint_against_brute_force(seed: int):
    """For random sizes (shrinking and enlarging), a patch changes only outputs inside its windows, and the widest
    run of changed outputs over every position and two contents is exactly what footprint() says, at most."""
    rng = np.random.default_rng(seed)
    for _ in range(12):
        src, dst = int(rng.integers(4, 300)), int(rng.integers(4, 48))
        if rng.random() < 0.3:
            src, dst = dst, src
        p = int(rng.integers(1, min(src, 25) + 1))
        base = rng.integers(0, 256, (2, src, 3), dtype=np.uint8)
        clean = _resize_rows(base, dst)
        lo, hi = camera.windows(src, dst)
        widest = 0
        for a in range(src - p + 1):
            for value in (0, 255):
                x = base.copy()
                x[:, a:a + p] = value
                changed = np.flatnonzero((_resize_rows(x, dst) != clean).any(axis=(0, 2)))
                if len(changed):
                    inside = np.flatnonzero((lo < a + p) & (hi > a))
                    assert set(changed) <= set(inside)
                    widest = max(widest, changed[-1] - changed[0] + 1)
        fp = camera.footprint(p, src, dst)
        assert widest <= fp <= camera.footprint_bound(p, src, dst)


def test_footprint_examples():
    assert camera.footprint(24, 96, 32) <= 10  # a 3x shrink: ceil(24 / 3) + 2
    assert camera.footprint(5, 32, 32) == 5  # no resize
    assert camera.footprint(50, 20, 32) == 32  # a patch larger than the region covers all of it


def test_camera_threat_maps_per_region():
    t = parse("24x24,8x40@camera")
    mapped = camera.to_model(t, (128, 256), (32, 32))
    assert mapped.rects == ((camera.footprint(24, 128, 32), camera.footprint(24, 256, 32)),
                            (camera.footprint(8, 128, 32), camera.footprint(40, 256, 32)))
    with pytest.raises(ThreatError, match="reaches"):
        camera.to_model(parse("40x40@camera"), (40, 40), (32, 32))


def test_verdict_names_both_threats_and_refuses_what_cannot_hold():
    c = certinfer.load(threat="24x24@camera")
    frame = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    small, big = c(frame, rois=[(0, 0, 20, 20), (0, 0, 384, 288)])
    assert small.status == "uncertified" and small.reason.startswith("not certifiable")
    assert small.certificate.threat == "24x24@camera" and small.certificate.per_rect == {}
    assert big.certificate.threat == "24x24@camera"
    assert big.certificate.model_threat == f"{camera.footprint(24, 288, 32)}x{camera.footprint(24, 384, 32)}"
    whole = c(frame)[0]  # no boxes: the whole frame's resize
    assert whole.roi is None and whole.certificate.model_threat == "{}x{}".format(
        camera.footprint(24, 300, 32), camera.footprint(24, 400, 32))
    with pytest.raises(ValueError, match="camera pixels"):
        c.certify_frames(frame[None])


def _sign_frame(images: np.ndarray, side: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """GTSRB-sized test images enlarged to ``side`` pixels and laid side by side in a grey frame."""
    frame = np.full((side + 40, len(images) * (side + 20) + 20, 3), 128, np.uint8)
    boxes = []
    for i, im in enumerate(images):
        x = 20 + i * (side + 20)
        frame[20:20 + side, x:x + side] = np.asarray(Image.fromarray(im).resize((side, side), Image.BILINEAR))
        boxes.append((x, 20, x + side, 20 + side))
    return frame, boxes


@pytest.mark.slow
def test_camera_patch_at_every_location_never_flips_a_certified_box():
    """On boxes the default bundle certifies against 4x4@camera (64-pixel boxes: 4x4 or less in the model), every
    placement of a 4x4 camera patch that touches the box, black or white, leaves the label alone."""
    c = certinfer.load(threat="4x4@camera")
    files = sorted(certinfer.sample_frames().glob("gtsrb_test_*.png"))
    samples = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    frame, boxes = _sign_frame(samples, 64)
    verdicts = c(frame, rois=boxes)
    certified = [(b, v.label) for b, v in zip(boxes, verdicts) if v.status == "certified"]
    assert len(certified) >= 2
    plain = c.with_options(threat=verdicts[0].certificate.model_threat)
    for (x0, y0, x1, y1), label in certified[:2]:
        box = frame[y0:y1, x0:x1]  # all that regions.cut reads: a patch's part outside the box is cut away
        crops = []
        for y in range(-3, y1 - y0):
            for x in range(-3, x1 - x0):
                for value in (0, 255):
                    patched = box.copy()
                    patched[max(y, 0):y + 4, max(x, 0):x + 4] = value
                    crops.append(regions.cut(patched, (0, 0, x1 - x0, y1 - y0), c.input_hw))
        labels = [v.label for i in range(0, len(crops), 512) for v in plain.certify_frames(np.stack(crops[i:i + 512]))]
        assert labels == [label] * len(crops)
