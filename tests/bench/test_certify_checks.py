"""``certinfer certify``'s checks and plots: a dataset must have the bundle's classes; plots draw what has data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from certinfer.bench import certify_plots
from certinfer.train.background import check_classes
from certinfer.train.data import Split


def split(classes: int) -> Split:
    return Split(np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1, np.int64), [str(i) for i in range(classes)], "data")


def test_a_bundle_matches_its_classes_or_those_and_a_last_no_sign():
    check_classes([str(i) for i in range(43)], split(43).classes, "data")
    check_classes([str(i) for i in range(43)] + ["no sign"], split(43).classes, "data")
    with pytest.raises(ValueError, match="the bundle has 43 classes but data has 10"):
        check_classes([str(i) for i in range(43)], split(10).classes, "data")
    with pytest.raises(ValueError, match="the bundle has 44 classes but data has 43"):
        check_classes([str(i) for i in range(43)] + ["other"], split(43).classes, "data")


def _figure(monkeypatch: pytest.MonkeyPatch, per_rect: dict) -> object:
    saved = []
    monkeypatch.setattr(certify_plots, "_save", lambda fig, path: saved.append(fig))
    result = {"certified_accuracy_per_rect": per_rect, "clean_accuracy": 0.8, "data": "gtsrb:test",
              "defense": {"kind": "bagcert"}}
    certify_plots.plot_rects(result, Path("unused.png"))
    return saved[0]


def _colors(ax) -> list:
    return [tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
            for line in ax.get_lines() if not line.get_label().startswith("clean")]


def test_one_square_threat_draws_one_panel_with_a_colour_per_condition(monkeypatch: pytest.MonkeyPatch):
    fig = _figure(monkeypatch, {"3.2": {"5x5": 0.3}, "3.3": {"5x5": 0.1}})
    (ax,) = fig.axes
    assert ax.get_xlabel().startswith("square patch side") and len(set(_colors(ax))) == 2


def test_every_panel_colours_each_series_apart(monkeypatch: pytest.MonkeyPatch):
    fig = _figure(monkeypatch, {"3.2": {"2x2": 0.5, "2x12": 0.3}, "3.3": {"2x2": 0.4, "2x12": 0.2}})
    squares, others = fig.axes
    assert len(set(_colors(squares))) == 2
    bars = {tuple(c.patches[0].get_facecolor()) for c in others.containers}
    assert others.get_xlabel().startswith("non-square") and len(bars) == 2
