"""``certinfer bench testset``: class counts, shards, sign groups, and recording a result in a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from certinfer.bench.groups import GTSRB_GROUPS, per_group
from certinfer.bench.testset import class_counts, engines_of, merge, record, summary
from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.verdict import Verdict


class Scripted:
    """Answers each image with the label written in its first pixel, certified when the second says so."""

    def certify_frames(self, images: np.ndarray) -> list[Verdict]:
        return [Verdict(label=-1, class_name="", status="alert") if im[0, 0, 0] == 255 else
                Verdict(label=int(im[0, 0, 0]), class_name="", status="certified" if im[0, 0, 1] else "uncertified")
                for im in images]


def _images(labels, certified) -> np.ndarray:
    x = np.zeros((len(labels), 2, 2, 3), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = labels, certified
    return x


def _result(counts: dict, shard: str = "0/1", data: str = "gtsrb:test", n: int | None = None) -> dict:
    return {"bundle": "b", "engines": ["e"], "threat": "5x5", "data": data, "shard": shard, "classes": ["x"] * 43,
            "data_images": n if n is not None else sum(counts["images"]), "counts": counts, "seconds": 1.0,
            "commit": "c"}


def test_class_counts_match_the_verdicts():
    x = _images([0, 1, 1, 255, 2, 0], [1, 1, 0, 1, 1, 0])
    y = np.array([0, 1, 1, 1, 0, 0])
    c = class_counts(Scripted(), x, y, classes=3)
    assert c == {"images": [3, 3, 0], "right": [2, 2, 0], "certified": [1, 1, 0]}  # an alert is never right


def test_groups_from_counts_equal_groups_from_rows():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 43, 2000)
    labels = np.where(rng.random(2000) < 0.8, truth, rng.integers(0, 43, 2000))
    certified = rng.random(2000) < 0.4
    x = _images(labels, certified)
    s = summary(_result(class_counts(Scripted(), x, truth, classes=43)))
    rows = per_group(truth, labels == truth, certified)
    assert set(s["sign_groups"]) == set(GTSRB_GROUPS) and s["n"] == 2000
    for name, g in rows.items():
        assert s["sign_groups"][name] == pytest.approx(g)
    assert s["clean_accuracy"] == pytest.approx(np.mean(labels == truth))
    assert s["certified_accuracy"] == pytest.approx(np.mean((labels == truth) & certified))
    assert summary(_result(class_counts(Scripted(), x, truth, 43), data="cifar10:test"))["sign_groups"] == {}


def test_shards_add_up_and_must_match():
    a = _result({"images": [2, 1], "right": [1, 1], "certified": [0, 1]}, "0/2", n=5)
    b = _result({"images": [1, 1], "right": [1, 0], "certified": [1, 0]}, "1/2", n=5)
    m = merge([a, b])
    assert m["counts"] == {"images": [3, 2], "right": [2, 1], "certified": [1, 1]} and m["shard"] == "0/2,1/2"
    with pytest.raises(ValueError, match="twice"):
        merge([a, a])
    with pytest.raises(ValueError, match="threat"):
        merge([a, {**b, "threat": "2x2"}])


def test_record_writes_the_whole_split_into_the_sealed_manifest(tiny_bundle: Path):
    m = load_bundle(tiny_bundle).manifest
    counts = {"images": [3, 1], "right": [2, 1], "certified": [1, 0]}
    result = {**_result(counts), "engines": engines_of(m), "threat": m["threat"]}
    frames = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
    record(result, tiny_bundle, frames)
    sealed = load_bundle(tiny_bundle).manifest["provenance"]  # loads: the edit is sealed
    assert sealed["metrics"]["n"] == 4 and sealed["metrics"]["clean_accuracy"] == 0.75
    assert sealed["metrics"]["certified_accuracy"] == {"default": 0.25}
    assert sealed["latency"]["batch1_p50_ms"] > 0 and sealed["latency"]["backend"] == "onnxruntime-cpu"
    json.dumps(sealed)


def test_record_refuses_part_of_the_split_or_other_engines(tiny_bundle: Path):
    m = load_bundle(tiny_bundle).manifest
    before = (tiny_bundle / "manifest.json").read_bytes()
    counts = {"images": [3, 1], "right": [2, 1], "certified": [1, 0]}
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="every shard"):
        record({**_result(counts, n=10), "engines": engines_of(m), "threat": m["threat"]}, tiny_bundle, frames)
    with pytest.raises(ValueError, match="other engine files"):
        record({**_result(counts), "engines": ["0" * 64], "threat": m["threat"]}, tiny_bundle, frames)
    assert (tiny_bundle / "manifest.json").read_bytes() == before
