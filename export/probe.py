"""Receptive-field probe: perturb random patches of the real engine and check locality bit for bit.

A certificate over ``Geometry.affected`` is only as good as the claim that a patch changes nothing
else. The probe runs the engine's pre-threshold output (N, H', W', C) on an image and on copies with
a random patch, and requires every output outside ``affected()`` to be bit-identical. It also checks
that a frame's outputs do not depend on the batch it ran in (an attacker's frame may run alone).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from certinfer.runtime.geometry import Geometry


class ProbeError(AssertionError):
    """The engine's outputs change outside the manifest geometry's affected ranges."""


def _outside_mask(geometry: Geometry, rect: tuple[int, int], loc: tuple[int, int]) -> np.ndarray:
    (r0, r1), (c0, c1) = geometry.affected(rect, loc)
    mask = np.ones(geometry.output_hw, dtype=bool)
    mask[r0:r1, c0:c1] = False
    return mask


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def probe(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, geometry: Geometry,
          rects: list[tuple[int, int]], trials: int = 64, batch: int = 8, seed: int = 0,
          batch_invariance: bool = True) -> dict:
    """Probe ``run`` (NCHW float32 -> (N, H', W', C) float32) with ``trials`` random patches.

    Raises :class:`ProbeError` on the first output outside ``affected()`` that changed; returns a report.
    """
    rng = np.random.default_rng(seed)
    h, w = geometry.input_hw
    changed_inside, checked = 0, 0
    lo, hi = float(images.min()), float(images.max())
    for t in range(0, trials, batch):
        k = min(batch, trials - t)
        base = images[rng.integers(len(images))]
        patched, masks = [], []
        for _ in range(k):
            rh, rw = rects[rng.integers(len(rects))]
            top, left = int(rng.integers(h - rh + 1)), int(rng.integers(w - rw + 1))
            x = base.copy()
            x[:, top:top + rh, left:left + rw] = rng.uniform(lo, hi, size=(x.shape[0], rh, rw))
            patched.append(x)
            masks.append(_outside_mask(geometry, (rh, rw), (top, left)))
        out = run(np.stack([base] + patched).astype(np.float32))
        ref = _bits(out[0])
        if batch_invariance and not np.array_equal(ref, _bits(run(base[None].astype(np.float32))[0])):
            raise ProbeError("engine outputs depend on the batch a frame runs in: not bit-exact")
        for i, mask in enumerate(masks):
            diff = (_bits(out[i + 1]) != ref).any(axis=-1)
            if (diff & mask).any():
                r, c = np.argwhere(diff & mask)[0]
                raise ProbeError(f"output cell ({r}, {c}) changed although it lies outside the affected range "
                                 f"of a patch: the real receptive field exceeds the manifest geometry")
            changed_inside += int(diff.any())
            checked += 1
    return {"trials": checked, "rects": [list(r) for r in rects], "bit_exact": True,
            "batch_invariant": batch_invariance,
            "patches_that_changed_outputs": changed_inside}
