"""``certinfer bench cascade`` on two golden bundles and a tiny image folder: the JSON, the plot, the sweep."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certinfer.cli import main

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
COLOURS = {"0-red": (255, 0, 0), "1-green": (0, 255, 0), "2-blue": (0, 0, 255), "3-yellow": (255, 255, 0)}


def _folder(root: Path) -> Path:
    """Two 16x16 images per golden class: the solid colour, and the colour with noise."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        solid = np.broadcast_to(np.array(rgb, np.uint8), (16, 16, 3))
        noisy = np.clip(solid + rng.integers(-60, 60, solid.shape), 0, 255).astype(np.uint8)
        for i, img in enumerate((solid, noisy)):
            Image.fromarray(np.ascontiguousarray(img)).save(root / name / f"{i}.png")
    return root


def test_bench_cascade_writes_rates_latency_and_the_deadline_sweep(tmp_path: Path, capsys: pytest.CaptureFixture):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    stages = [str(GOLDEN / "bundles" / "masking-ds"), str(GOLDEN / "bundles" / "masking-bn")]
    out = tmp_path / "results" / "cascade.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "cascade", "-b", stages[0], "-b", stages[1], "--data", f"folder:{_folder(tmp_path / 'data')}",
              "--images", "6", "--deadline", "0.001", "--deadline", "100000", "--backend", "onnxruntime-cpu",
              "--threat", "2x2", "--out", str(out)])
    assert exit_info.value.code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["images"] == 6 and result["bundles"] == stages and result["threat"] == "2x2"
    configs = result["configs"]
    assert list(configs) == ["cascade", *stages]
    for c in configs.values():
        assert 0 <= c["certified_accuracy"] <= c["clean_accuracy"] <= 1 and 0 <= c["alert_rate"] <= 1
        assert 0 < c["mean_ms"] <= c["p99_ms"]
    assert configs["cascade"]["ran"][stages[0]] == 1.0
    tight, loose = result["deadline_sweep"]
    assert tight["deadline_ms"] == 0.001 and tight["fail_safe_rate"] == 1.0  # no stage fits
    # a budget every stage fits: the same stages, so the same verdicts as without a deadline
    assert {k: loose[k] for k in ("certified_accuracy", "clean_accuracy", "alert_rate", "ran")} == {
        k: configs["cascade"][k] for k in ("certified_accuracy", "clean_accuracy", "alert_rate", "ran")}
    assert set(loose["estimates_ms"]) == set(stages)
