"""Shared patch-attack harness (tests and ``certinfer bench soundness``): every location of a rectangle,
with several kinds of patch content.

Contents: random noise, solid colours, pixels copied from another image, and PGD on a differentiable
torch surrogate (transferred to the real engine). ``count_flips`` runs the engine-side decision on every
patched image and reports the certified frames whose label changed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def locations(input_hw: tuple[int, int], rect: tuple[int, int]) -> np.ndarray:
    """Every top-left corner (L, 2) of a ``rect`` patch fully inside the input."""
    h, w = rect
    tops, lefts = np.meshgrid(np.arange(input_hw[0] - h + 1), np.arange(input_hw[1] - w + 1), indexing="ij")
    return np.stack([tops.ravel(), lefts.ravel()], axis=1)


def paste(x: np.ndarray, rect: tuple[int, int], locs: np.ndarray, contents: np.ndarray) -> np.ndarray:
    """Copies of one CHW image ``x``, with ``contents[k]`` (C, h, w) pasted at ``locs[k]``: (L, C, H, W)."""
    h, w = rect
    out = np.repeat(x[None], len(locs), axis=0)
    for k, (t, l) in enumerate(locs):
        out[k, :, t:t + h, l:l + w] = contents[k]
    return out


def random_contents(rng, n: int, c: int, rect, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return rng.uniform(lo[:, None, None], hi[:, None, None], size=(n, c) + tuple(rect)).astype(np.float32)


def solid_contents(rng, n: int, c: int, rect, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    corner = rng.integers(0, 2, size=(n, c)).astype(bool)  # saturated colours: each channel at lo or hi
    return np.where(corner, hi, lo)[:, :, None, None].repeat(rect[0], 2).repeat(rect[1], 3).astype(np.float32)


def copied_contents(other: np.ndarray, rect, locs: np.ndarray) -> np.ndarray:
    """The same region cut from another image (e.g. of a different class)."""
    h, w = rect
    return np.stack([other[:, t:t + h, l:l + w] for t, l in locs]).astype(np.float32)


def pgd_contents(objective: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, rect, locs: np.ndarray,
                 lo: np.ndarray, hi: np.ndarray, steps: int = 20, step: float = 0.1, seed: int = 0) -> np.ndarray:
    """Patch contents maximizing ``objective`` (per-sample, on a (L, C, H, W) batch) by signed-gradient ascent."""
    g = torch.Generator().manual_seed(seed)
    lo_t, hi_t = torch.tensor(lo)[None, :, None, None], torch.tensor(hi)[None, :, None, None]
    h, w = rect
    mask = torch.zeros((len(locs), 1) + x.shape[1:])
    for k, (t, l) in enumerate(locs):
        mask[k, :, t:t + h, l:l + w] = 1
    base = torch.from_numpy(x)[None].repeat(len(locs), 1, 1, 1)
    delta = lo_t + (hi_t - lo_t) * torch.rand(base.shape, generator=g)
    for _ in range(steps):
        delta.requires_grad_(True)
        adv = base * (1 - mask) + delta * mask
        grad, = torch.autograd.grad(objective(adv).sum(), delta)
        with torch.no_grad():
            delta = torch.minimum(torch.maximum(delta + step * (hi_t - lo_t) * grad.sign(), lo_t), hi_t)
    adv = (base * (1 - mask) + delta * mask).detach().numpy()
    return np.stack([adv[k, :, t:t + h, l:l + w] for k, (t, l) in enumerate(locs)])


def count_flips(decide: Callable[[np.ndarray], np.ndarray], x: np.ndarray, label: int, rect, locs: np.ndarray,
                contents: np.ndarray, chunk: int = 512) -> int:
    """How many patched copies of ``x`` the engine-side ``decide`` labels other than ``label``."""
    flips = 0
    for i in range(0, len(locs), chunk):
        batch = paste(x, rect, locs[i:i + chunk], contents[i:i + chunk])
        flips += int((decide(batch) != label).sum())
    return flips
