"""Dataset evaluation: variants that share an inference key share one inference per batch; shards merge."""

from __future__ import annotations

import numpy as np

from certinfer.runtime.evaluate import evaluate_certifier, merge, shard_indices


class CountingEngine:
    def __init__(self, inner):
        self.inner, self.name, self.precision, self.max_batch = inner, inner.name, inner.precision, inner.max_batch
        self.batches: list[int] = []

    def run(self, batch):
        self.batches.append(len(batch))
        return self.inner.run(batch)


def test_variants_are_grouped_by_inference_key_and_counted_apart(certifier):
    engine = certifier.engines["model"] = CountingEngine(certifier.engine)
    x = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    y = np.array([int(v.label) for v in certifier(x)])
    engine.batches.clear()
    variants = {"3x3": certifier, "again": certifier.with_options(), "2x2": certifier.with_options(threat="2x2")}
    r = evaluate_certifier(certifier, x, y, batch=4, variants=variants)
    assert engine.batches == [4, 4, 4, 4, 2, 2]  # two inference groups per batch, three batches
    assert r["n"] == 10 and r["clean"] == 10 and r["clean_accuracy"] == 1.0 and r["threat"] == "3x3"
    assert set(r["variants"]) == set(variants) and r["certified_accuracy"] == {k: 0.0 for k in variants}
    assert set(r["variants"]["2x2"]["per_rect"]) == {"2x2"} and set(r["variants"]["3x3"]["per_rect"]) == {"3x3"}
    assert set(r["seconds"]) == {"prepare", "engine", "certify"} and r["seconds"]["engine"] > 0
    parts = [evaluate_certifier(certifier, x[i], y[i], batch=4, variants=variants)
             for i in (shard_indices(10, "0/2"), shard_indices(10, "1/2"))]
    merged = merge(parts)
    assert merged["variants"] == r["variants"] and merged["n"] == 10
    assert evaluate_certifier(certifier, x, (y + 1) % 4)["clean_accuracy_per_variant"] == {"default": 0.0}


def test_threat_shares_inference_only_where_features_do_not_depend_on_it() -> None:
    from pathlib import Path

    from certinfer.runtime.loader import load

    golden = Path(__file__).resolve().parents[1] / "golden" / "bundles"
    for name, shared in (("bagcert", True), ("masking-bn", True), ("cropping-exhaustive", True), ("ibp", False),
                         ("scalecert", False)):
        c = load(golden / name, backend="onnxruntime-cpu")
        other = c.with_options(threat="1x1")
        assert (other.infer_key() == c.infer_key()) is shared, name
