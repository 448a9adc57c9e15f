"""The no-sign rates of ``certinfer bench background``, on scripted answers."""

from __future__ import annotations

import numpy as np

from certinfer.bench.background import rates
from certinfer.runtime.verdict import Verdict


class Scripted:
    """Answers each image with the label and status written in its first pixel."""

    def __init__(self, classes: list[str]):
        self.classes = classes

    def certify_frames(self, images: np.ndarray) -> list[Verdict]:
        return [Verdict(label=-1, class_name="", status="alert") if im[0, 0, 0] == 255 else
                Verdict(label=int(im[0, 0, 0]), class_name="", status="certified" if im[0, 0, 1] else "uncertified")
                for im in images]


def _images(labels: list[int], certified: list[int]) -> np.ndarray:
    x = np.zeros((len(labels), 4, 4, 3), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = labels, certified
    return x


def test_rates_count_what_they_say():
    c = Scripted(["a", "b", "no sign"])
    signs = _images([0, 1, 2, 0], [1, 0, 1, 0])
    truth = np.array([0, 0, 1, 0])
    scenes = {"road": _images([2, 2, 0], [1, 0, 1]), "cifar": _images([1], [0])}
    r = rates(c, signs, truth, scenes)
    assert r["clean"] == 0.5 and r["certified"] == 0.25 and r["false_no_sign"] == 0.25
    assert r["sources"]["road"] == {"images": 3, "false_sign": 1 / 3, "alert": 0.0, "certified_no_sign": 1 / 3}
    assert r["false_sign"] == 0.5 and r["certified_no_sign"] == 0.25 and r["alert"] == 0.0


def test_an_alert_is_not_a_sign():
    """A detection defense's alert (label -1) names no class: it counts as an alert, not as a false sign."""
    scenes = {"road": _images([255, 255, 0, 1], [0, 0, 1, 1])}
    r = rates(Scripted(["a", "no sign"]), _images([0], [1]), np.array([0]), scenes)
    assert r["false_sign"] == 0.25 and r["alert"] == 0.5 and r["certified_no_sign"] == 0.25


def test_without_a_no_sign_class_every_scene_is_a_false_sign():
    r = rates(Scripted(["a", "b"]), _images([0], [1]), np.array([0]), {"road": _images([1, 0], [1, 1])})
    assert r["false_sign"] == 1.0 and r["certified_no_sign"] == 0.0 and r["false_no_sign"] == 0.0


def test_groups_cover_every_gtsrb_class_once():
    from certinfer.bench.groups import GTSRB_GROUPS, per_group

    members = sorted(c for classes in GTSRB_GROUPS.values() for c in classes)
    assert members == list(range(43))
    truth = np.array([0, 1, 9, 14])
    groups = per_group(truth, np.array([True, False, True, True]), np.array([True, True, False, True]))
    assert groups["speed limits"] == {"images": 2, "clean": 0.5, "certified": 0.5}
    assert groups["other prohibitory"]["certified"] == 0.0 and "danger" not in groups
