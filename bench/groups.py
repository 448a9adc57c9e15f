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


def per_group(truth: np.ndarray, right: np.ndarray, certified: np.ndarray) -> dict[str, dict]:
    """Clean and certified accuracy per GTSRB group (``right``: label correct; ``certified``: certified)."""
    out = {}
    for name, classes in GTSRB_GROUPS.items():
        member = np.isin(truth, classes)
        if member.any():
            out[name] = {"images": int(member.sum()), "clean": float(right[member].mean()),
                         "certified": float((right & certified)[member].mean())}
    return out
