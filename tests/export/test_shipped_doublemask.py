"""The shipped doublemask-gtsrb bundle: probed, and its certificates on a fixed slice of the GTSRB test set are
exactly those recorded when it shipped (a changed engine file or a broken runtime fails here)."""

from __future__ import annotations

import numpy as np
import pytest

import certinfer
from certinfer.export.probe import probe_bundle
from certinfer.runtime.packaged import resolve

NAME = "doublemask-gtsrb"
SLICE = 100  # the first 100 test images: 94 correct, 47 of them certified, 47 certified in all (onnxruntime CPU)


@pytest.mark.slow
def test_shipped_bundle_certifies_the_slice_it_shipped_with(gtsrb_root) -> None:
    from certinfer.train import data

    test = data.load("gtsrb:test", gtsrb_root)
    certifier = certinfer.load(NAME, backend="onnxruntime-cpu", engine_options={"threads": 1})
    verdicts = certifier(test.x[:SLICE])
    labels = np.array([v.label for v in verdicts])
    certified = np.array([v.certificate.certified for v in verdicts])
    correct = labels == test.y[:SLICE]
    assert (int(correct.sum()), int((correct & certified).sum()), int(certified.sum())) == (94, 47, 47)
    recorded = certifier.manifest["provenance"]["metrics"]
    assert recorded["n"] == 500 and recorded["clean_accuracy"] == 0.946


@pytest.mark.slow
def test_shipped_bundle_passes_its_probe() -> None:
    report = probe_bundle(resolve(NAME), backends=["onnxruntime-cpu"])["onnxruntime-cpu"]
    assert report["status"] == "passed" and report["listed_exact"], report
    assert report["batch"]
