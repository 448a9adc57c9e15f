"""GTSRB's sign groups (Stallkamp et al. 2012), for accuracy per group: at 32x32 a patch can hide the one digit
that tells two speed limits apart, so some groups are harder to certify than others."""

from __future__ import annotations

import numpy as np

GTSRB_GROUPS: dict[str, tuple[int, ...]] = {
    "speed limits": (0, 1, 2, 3, 4, 5, 7, 8),
    "other prohibitory": (9, 10, 15, 16),
    "danger": (11, *range(18, 32)),
    "mandatory": tuple(range(33, 41)),
    "others": (6, 12, 13, 14, 17, 32, 41, 42),  # derestriction and unique signs
}


def group_rates(images: np.ndarray, right: np.ndarray, certified: np.ndarray) -> dict[str, dict]:
    """Clean and certified accuracy per GTSRB group from per-class counts (images, right, certified and right)."""
    out = {}
    for name, classes in GTSRB_GROUPS.items():
        member = [c for c in classes if c < len(images)]
        if k := int(images[member].sum()):
            out[name] = {"images": k, "clean": float(right[member].sum() / k),
                         "certified": float(certified[member].sum() / k)}
    return out


def per_group(truth: np.ndarray, right: np.ndarray, certified: np.ndarray) -> dict[str, dict]:
    """Clean and certified accuracy per GTSRB group (``right``: label correct; ``certified``: certified)."""
    size = max(max(c for g in GTSRB_GROUPS.values() for c in g), int(truth.max(initial=0))) + 1
    return group_rates(np.bincount(truth, minlength=size), np.bincount(truth[right], minlength=size),
                       np.bincount(truth[right & certified], minlength=size))
