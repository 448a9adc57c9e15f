"""bench/gpu.sh, the prepared GPU measurement: what it would time."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import certinfer

REPO = Path(__file__).resolve().parents[2]


def test_gpu_script_times_every_shipped_bundle():
    script = (REPO / "bench" / "gpu.sh").read_text()
    patterns = re.search(r"^bundles=\((.+)\)$", script, re.M).group(1).split()
    folders = [Path(m) for p in patterns for m in glob.glob(str(REPO / p))]
    names = {"default" if f.name == "default_bundle" else f.name for f in folders}
    assert names == set(certinfer.bundle_names())
