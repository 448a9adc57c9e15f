"""BagCert certification math against a slow, obviously correct Condition 3.1."""

import numpy as np
import pytest

from certinfer.threat import parse, rect_key
from certinfer.runtime.defenses import bagcert
from certinfer.runtime.geometry import Geometry
from certinfer.bench.bagcert_reference import condition_31_margin as brute_force_31


def random_geometry(rng):
    rf = int(rng.integers(1, 8))
    stride = int(rng.integers(1, 3))
    pad = int(rng.integers(0, rf))
    n = int(rng.integers(6, 13))
    out = (n + 2 * pad - rf) // stride + 1
    return Geometry((rf, rf), (stride, stride), (pad, pad), (n, n), (out, out))


@pytest.mark.parametrize("seed", range(40))
def test_condition_32_equals_brute_force_31(seed):
    rng = np.random.default_rng(seed)
    g = random_geometry(rng)
    c = int(rng.integers(2, 5))
    # biased maps so some cases certify and some do not
    p = rng.uniform(0.05, 0.4, size=c)
    p[0] = rng.uniform(0.5, 1.0)
    s = (rng.random(g.output_hw + (c,)) < p).astype(np.uint8)
    rect = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    label = 0
    cert = bagcert.certify(s, label, g, parse(f"{rect[0]}x{rect[1]}"))
    ref = brute_force_31(s.astype(int), label, g, rect)
    # Condition 3.2's slack is exactly Condition 3.1's worst vote gap (|R| is already inside s_wc)
    assert cert.per_rect[rect_key(rect)].margin == ref
    assert cert.certified == (ref > 0)


def test_batch_matches_single_and_33_is_weaker():
    rng = np.random.default_rng(7)
    g = Geometry((5, 5), (2, 2), (2, 2), (32, 32), (16, 16))
    threat = parse("5x5,area:24,rot45:3x3", input_hw=(32, 32))
    p = np.full(10, 0.1)
    p[3] = 0.9
    s = (rng.random((12, 16, 16, 10)) < p).astype(np.uint8)
    labels = np.full(12, 3)
    batch = bagcert.certify(s, labels, g, threat)
    for i in range(12):
        one = bagcert.certify(s[i], 3, g, threat)
        assert one == batch[i]
        weak = bagcert.certify(s[i], 3, g, threat, condition="3.3")
        for k in one.per_rect:  # 3.3 is a sufficient condition for 3.2: never certifies more
            assert weak.per_rect[k].margin <= one.per_rect[k].margin
    assert any(c.certified for c in batch)


def test_ties_are_never_certified():
    g = Geometry((1, 1), (1, 1), (0, 0), (8, 8), (8, 8))
    s = np.zeros((8, 8, 3), np.uint8)
    s[..., 0] = 1
    s[..., 1] = 1  # classes 0 and 1 tie everywhere
    counts, pred = bagcert.predict(s)
    assert counts[0, 0] == counts[0, 1]
    assert not bagcert.certify(s, int(pred[0]), g, parse("1x1")).certified


def test_patch_that_touches_nothing_still_needs_a_strict_win():
    # stride larger than the receptive field: a 1x1 patch on a skipped pixel touches no output
    g = Geometry((1, 1), (2, 2), (0, 0), (4, 4), (2, 2))
    s = np.zeros((2, 2, 2), np.uint8)
    s[..., 0] = 1
    cert = bagcert.certify(s, 0, g, parse("1x1"))
    assert cert.certified and cert.per_rect["1x1"].margin == (4 - 1) - 0 - 1  # worst location touches one cell


def test_uncertain_cells_are_assumed_adversarial():
    g = Geometry((1, 1), (1, 1), (0, 0), (6, 6), (6, 6))
    s = np.zeros((6, 6, 2), np.uint8)
    s[..., 0] = 1
    s[0, :, 1] = 1  # class 1 has 6 votes, class 0 has 36
    base = bagcert.certify(s, 0, g, parse("2x2"))
    assert base.certified and base.per_rect["2x2"].margin == 36 - 6 - 4 - 4 + 0
    uncertain = np.zeros_like(s)
    uncertain[1:4, :, :] = 1  # 18 cells near the threshold: class 0 may lose them, class 1 may gain them
    cert = bagcert.certify(s, 0, g, parse("2x2"), uncertain=uncertain)
    assert cert.per_rect["2x2"].margin == base.per_rect["2x2"].margin - 2 * 18
    assert not cert.certified


def test_split_code_and_bad_inputs():
    code = np.array([0, 1, 2, 3], np.uint8)
    s, near = bagcert.split_code(code)
    assert s.tolist() == [0, 1, 0, 1] and near.tolist() == [0, 0, 1, 1]
    g = Geometry((1, 1), (1, 1), (0, 0), (4, 4), (4, 4))
    with pytest.raises(ValueError):
        bagcert.certify(np.zeros((4, 4)), 0, g, parse("1x1"))
    with pytest.raises(ValueError):
        bagcert.certify(np.zeros((4, 4, 2)), 0, g, parse("1x1"), condition="3.4")


@pytest.mark.parametrize("seed", range(10))
def test_rival_pruning_keeps_margins_exact(seed):
    rng = np.random.default_rng(seed)
    g = Geometry((3, 3), (2, 2), (1, 1), (16, 16), (8, 8))
    c = 12
    p = rng.uniform(0.0, 0.6, size=c)  # close rivals, so the bound often forces the exact fallback
    s = (rng.random((20, 8, 8, c)) < p).astype(np.int32)
    labels = s.sum(axis=(1, 2)).argmax(axis=1)
    rects = [(1, 1), (3, 3), (2, 5)]
    full = bagcert.condition_32(s, labels, g, rects, rivals=c - 1)
    for rivals in (1, 2, 4):
        pruned = bagcert.condition_32(s, labels, g, rects, rivals=rivals)
        for r in rects:
            assert np.array_equal(pruned[r], full[r])
