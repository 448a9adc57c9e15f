"""The GPU script's paper-network timing runs (on the CPU here, with a small batch)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")


def test_paper_network_timing_runs_on_cpu() -> None:
    from certinfer.bench.gpu_paper import measure

    r = measure(preset="gtsrb-cpu", device="cpu", frames=1, repeats=1)  # the paper network is slow on a CPU
    assert r["masks"] == 36 and r["pairs"] == 36 * 37 // 2  # 9x9 masks at stride 5 on 32x32
    assert r["ms_certified_frame"] == r["ms_one_mask_round_1_frame"] + r["ms_two_mask_round_1_frame"] > 0
