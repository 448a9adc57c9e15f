"""Randomized cropping math: overlap counts by brute force, p_c against direct sums and Monte Carlo, ties as flips,
the vectorized crop gather against a loop, and the exhaustive certificate."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest

from certinfer.runtime.defenses import cropping
from certinfer.threat import parse


def brute_force_overlaps(input_hw, crop_hw, rect) -> tuple[int, int]:
    """(max over patch positions of the crop positions it overlaps, all crop positions), by counting."""
    (m1, m2), (k1, k2), (p1, p2) = input_hw, crop_hw, rect
    crops = [(r, c) for r in range(m1 - k1 + 1) for c in range(m2 - k2 + 1)]
    best = 0
    for s in range(m1 - p1 + 1):
        for t in range(m2 - p2 + 1):
            hit = sum(1 for r, c in crops if r <= s + p1 - 1 and r + k1 - 1 >= s and c <= t + p2 - 1 and c + k2 - 1 >= t)
            best = max(best, hit)
    return best, len(crops)


@pytest.mark.parametrize("input_hw,crop_hw,rect", [
    ((32, 32), (10, 10), (5, 5)), ((12, 9), (4, 3), (2, 5)), ((10, 10), (8, 8), (6, 1)), ((7, 11), (7, 2), (3, 3)),
    ((9, 9), (1, 1), (9, 9)), ((16, 16), (12, 5), (3, 14)),
])
def test_overlap_probability_matches_brute_force_counting(input_hw, crop_hw, rect):
    adv, total = brute_force_overlaps(input_hw, crop_hw, rect)
    assert cropping.max_overlapped(input_hw, crop_hw, rect) == adv
    assert cropping.overlap_probability(input_hw, crop_hw, rect) == adv / total
    wor = cropping.overlap_probability(input_hw, crop_hw, rect, replace=False)
    assert (wor.adv, wor.total) == (adv, total) and float(wor) == adv / total
    # Eq. 2 in closed form, where the patch fits between two crop widths of border
    (m1, m2), (k1, k2), (p1, p2) = input_hw, crop_hw, rect
    assert adv == min(p1 + k1 - 1, m1 - k1 + 1) * min(p2 + k2 - 1, m2 - k2 + 1)


def test_paper_setting_and_threat_worst_rectangle():
    # CIFAR-10, 10x10 crops, 2.4% = 5x5: 14 x 14 of the 23 x 23 crop positions
    assert cropping.overlap_probability((32, 32), (10, 10), parse("2.4%", (32, 32))) == 196 / 529
    threat = parse("5x5,2x12,rot45:5x5", (32, 32))  # rot45:5x5 is its 8x8 bounding box
    worst = max(cropping.overlap_probability((32, 32), (10, 10), r) for r in threat.rects)
    assert cropping.overlap_probability((32, 32), (10, 10), threat) == worst == 17 * 17 / 529


def binomial_sum(votes, n, p) -> float:
    """Eq. 6 with ties as flips, summed directly in exact arithmetic."""
    top = sorted(votes, reverse=True) + [0]
    need = math.ceil((top[0] - top[1]) / 2)
    p = Fraction(p)
    return float(sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(need)))


@pytest.mark.parametrize("votes,p", [([120, 8, 0], 196 / 529), ([64, 64], 0.3), ([100, 27, 1], 0.05),
                                     ([128, 0], 0.37), ([70, 40, 18], 0.1), ([3, 2, 1, 0], 0.5)])
def test_certificate_matches_a_direct_binomial_sum(votes, p):
    n = sum(votes)
    assert cropping.certificate(np.array(votes), n, p) == pytest.approx(binomial_sum(votes, n, p), rel=1e-12, abs=1e-300)


def test_ties_count_as_flips():
    n, p = 10, 0.2
    # gap 4: the paper's floor(4/2) + 1 = 3 overlapped crops; but 2 changed crops already tie (4 vs 4): a flip
    pc = cropping.certificate(np.array([7, 3]), n, p)
    assert pc == pytest.approx(sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(2)))
    assert cropping.needed_overlaps(np.array([[7, 3], [6, 3], [5, 5], [10, 0]])).tolist() == [2, 2, 0, 5]
    assert cropping.certificate(np.array([5, 5]), 10, 0.0) == 0.0  # a tie is never certified, even with p = 0
    # batched form agrees with the single one
    batch = np.array([[7, 3], [9, 1], [5, 5]])
    assert cropping.certificate(batch, 10, p).tolist() == [cropping.certificate(v, 10, p) for v in batch]


def test_threshold_rule_matches_p_c_and_margin_sign():
    input_hw, crop_hw, threat = (32, 32), (10, 10), parse("5x5", (32, 32))
    p = cropping.overlap_probability(input_hw, crop_hw, threat)
    rng = np.random.default_rng(0)
    firsts = rng.integers(64, 129, size=200)
    votes = np.stack([firsts, 128 - firsts], axis=1)
    for threshold in (0.93, 0.95, 0.99):
        certs = cropping.vote_certificates(votes, input_hw, crop_hw, threat, threshold=threshold)
        pc = cropping.certificate(votes, 128, p)
        for c, v in zip(certs, pc):
            assert c.kind == "probabilistic" and c.p == v
            assert c.certified == (v >= threshold) == (c.per_rect["5x5"].margin > 0)


def test_without_replacement_is_exact_and_agrees_with_monte_carlo():
    input_hw, crop_hw, rect = (16, 16), (6, 6), (3, 3)
    wor = cropping.overlap_probability(input_hw, crop_hw, rect, replace=False)
    adv, total = wor.adv, wor.total
    n, trials = 60, 40000
    rng = np.random.default_rng(1)
    overlapped = (cropping.draw_locations(rng, trials, n, total, replace=False) < adv).sum(axis=1)  # first adv overlap
    tol = 4 * 0.5 / math.sqrt(trials)  # 4 sigma of a proportion
    for votes in ([60, 0], [50, 10], [45, 15], [40, 20], [38, 22]):
        need = cropping.needed_overlaps(np.array(votes))
        exact = cropping.certificate(np.array(votes), n, wor)
        estimate = float((overlapped < need).mean())
        assert abs(exact - estimate) <= tol, (votes, exact, estimate)
        assert exact >= estimate - tol  # never below the estimate by more than the tolerance
        # the hypergeometric sum, directly
        direct = sum(Fraction(math.comb(adv, i) * math.comb(total - adv, n - i), math.comb(total, n)) for i in range(need))
        assert exact == pytest.approx(float(direct), rel=1e-12)
    # drawing more crops than there are locations is impossible without replacement
    with pytest.raises(ValueError):
        cropping.certificate(np.array([total + 1, 0]), total + 1, wor)


def test_without_replacement_at_large_n_pins_the_overlap_count():
    # 512 of the 529 locations: between 512 - 333 = 179 and 196 of them overlap the worst 5x5 patch, surely
    p_nr = cropping.overlap_probability((32, 32), (10, 10), (5, 5), replace=False)
    assert cropping.certificate(np.array([400, 112]), 512, p_nr) == 0.0  # needs 144 <= 179: always reached
    assert cropping.certificate(np.array([394, 118]), 512, p_nr) == 0.0
    assert cropping.certificate(np.array([512, 0]), 512, p_nr) == 1.0  # needs 256 > 196: never reached
    assert 0.0 < cropping.certificate(np.array([450, 62]), 512, p_nr) < 1.0  # needs 194


def test_exhaustive_certificate_is_deterministic_gap_over_twice_the_overlaps():
    input_hw, crop_hw, threat = (32, 32), (10, 10), parse("5x5", (32, 32))
    k = cropping.max_overlapped(input_hw, crop_hw, threat)
    assert (k, cropping.crop_locations(input_hw, crop_hw)) == (196, 529)
    rows = np.array([[461, 68, 0], [460, 68, 1]])  # gaps 2k + 1 (certified) and 2k (a patch can force a tie)
    certs = cropping.vote_certificates(rows, input_hw, crop_hw, threat, exhaustive=True)
    assert [c.certified for c in certs] == [True, False]
    assert [c.per_rect["5x5"].margin for c in certs] == [1.0, 0.0]
    assert all(c.kind == "recovery" and c.p is None for c in certs)


def test_cut_gathers_every_crop_like_a_loop():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 3, 12, 9)).astype(np.float32)
    crop = (4, 3)
    total = cropping.crop_locations((12, 9), crop)
    flat = cropping.draw_locations(rng, 3, 7, total, replace=True)
    out = cropping.cut(x, crop, flat).reshape(3, 7, 5, *crop)
    for f in range(3):
        for j in range(7):
            top, left = divmod(int(flat[f, j]), 9 - 3 + 1)
            assert np.array_equal(out[f, j, :3], x[f, :, top:top + 4, left:left + 3])
            assert (out[f, j, 3] == top).all() and (out[f, j, 4] == left).all()


def test_draws_are_uniform_and_without_replacement_distinct():
    rng = np.random.default_rng(3)
    flat = cropping.draw_locations(rng, 2000, 20, 25, replace=False)
    assert all(len(set(row)) == 20 for row in flat)
    counts = np.bincount(flat.ravel(), minlength=25)
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()
    votes = cropping.count_votes(np.array([[0, 2, 2], [1, 1, 1]]), 3)
    assert votes.tolist() == [[1, 0, 2], [0, 3, 0]]


@pytest.mark.parametrize("replace,exhaustive", [(True, False), (False, False), (True, True)])
def test_plain_reference_gives_identical_certificates(replace, exhaustive):
    from certinfer.bench.cropping_reference import certify_reference

    rng = np.random.default_rng(int(replace) + 2 * int(exhaustive))
    hw, crop = (24, 24), (8, 8)
    threat = parse("2x2,1x3", input_hw=hw)
    n = cropping.crop_locations(hw, crop) if exhaustive else 48
    logits = rng.normal(size=(6, n, 4))
    logits[:, :, 0] += np.linspace(0, 6, 6)[:, None]  # some frames with wide vote gaps, some without
    votes = cropping.count_votes(logits.argmax(-1), 4)
    fast = cropping.vote_certificates(votes, hw, crop, threat, replace, 0.9, exhaustive)
    for i in range(len(logits)):
        slow = certify_reference(logits[i], hw, crop, threat, replace, 0.9, exhaustive)
        assert slow.per_rect == fast[i].per_rect and slow.certified == fast[i].certified and slow.kind == fast[i].kind
    assert any(c.certified for c in fast) and not all(c.certified for c in fast)


class _VoteEngine:
    """A stand-in crop classifier: class 1 for crops whose top offset (channel 3) is 0, else class 0."""

    name, precision, max_batch = "stub", "fp32", 1 << 20

    def run(self, batch: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(batch), 3), np.float32)
        logits[np.arange(len(batch)), (batch[:, 3, 0, 0] == 0).astype(int)] = 1.0
        return logits


def _certifier(**params) -> cropping.CroppingCertifier:
    from types import SimpleNamespace

    manifest = {"defense": {"kind": "cropping", "params": {"crop": [4, 4], **params}},
                "input": {"hw": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["a", "b", "c"]}}
    return cropping.CroppingCertifier(SimpleNamespace(manifest=manifest), {"model": _VoteEngine()},
                                      parse("2x2", input_hw=(8, 8)))


def test_certifier_votes_once_per_draw_and_certifies_variants_of_the_same_draw():
    cert = _certifier(crops=20).seeded(0)
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    features = cert.infer(cert.prepare(frames))
    top = features.locations // 5 == 0  # 5 x 5 crop locations; top row votes for class 1
    assert np.array_equal(features.votes[:, 1], top.sum(axis=1)) and (features.votes.sum(axis=1) == 20).all()
    strict = cert.with_options(threshold=0.999)
    assert strict.infer_key() == cert.infer_key() != cert.with_options(crops=21).infer_key()
    for a, b in zip(cert.certify(features), strict.certify(features)):
        assert a.label == b.label == 0 and a.certificate.p == b.certificate.p
        assert b.certificate.per_rect["2x2"].margin <= a.certificate.per_rect["2x2"].margin
    exhaustive = cert.with_options(exhaustive=True)
    assert exhaustive.kind == "recovery" and cert.kind == "probabilistic"
    with pytest.raises(ValueError, match="cannot be certified as"):  # a sampled draw is no exhaustive vote
        exhaustive.certify(features)
    with pytest.raises(ValueError, match="cannot be certified as"):
        cert.with_options(replace=False).certify(features)
    votes = exhaustive.infer(exhaustive.prepare(frames)).votes
    assert votes.tolist() == [[20, 5, 0]] * 3


def test_certifier_options_are_validated_against_the_bundle():
    with pytest.raises(ValueError, match="without replacement from 25 locations"):
        _certifier(crops=26, replace=False)
    with pytest.raises(ValueError, match="without replacement from 25 locations"):
        _certifier(crops=25, replace=False).with_options(crops=26)
    with pytest.raises(ValueError, match="mode must be one of"):
        _certifier(mode="random")
    with pytest.raises(ValueError, match="threshold"):
        _certifier().with_options(threshold=0.0)
    assert _certifier(crops=26, replace=False, mode="exhaustive").options.exhaustive


def test_only_sampled_crops_are_random_draws():
    """Exhaustive mode takes every location once, in order: deterministic, so it may be a cascade stage; sampled
    crops may not."""
    from certinfer.runtime.cascade import Cascade

    sampled, exhaustive = _certifier(crops=20), _certifier(mode="exhaustive")
    assert sampled.randomized and not exhaustive.randomized
    assert sampled.with_options(exhaustive=True).randomized is False
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    assert [v.certificate.per_rect for v in exhaustive(frames)] == [v.certificate.per_rect for v in exhaustive(frames)]
    Cascade([("exhaustive", exhaustive)])
    with pytest.raises(ValueError, match="randomized"):
        Cascade([("sampled", sampled)])


def test_near_ties_and_uncertain_crops_against_loops():
    from certinfer.bench.cropping_reference import near_ties_reference

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 30, 5)).astype(np.float32)
    logits[:, ::3, 1] = logits[:, ::3, 0] + rng.uniform(-2e-3, 2e-3, size=(4, 10)).astype(np.float32)
    logits[0, 0, :2] = 7.0  # an exact tie
    near = cropping.near_ties(logits, 1e-3)
    assert near.sum(axis=1).tolist() == [near_ties_reference(row, 1e-3) for row in logits] and near[0, 0]
    # each uncertain crop takes one overlapped crop off what the patch needs
    n, p = 10, 0.2
    assert cropping.certificate(np.array([8, 2]), n, p, 1) == cropping.certificate(np.array([7, 3]), n, p)
    assert cropping.certificate(np.array([[8, 2], [6, 4]]), n, p, np.array([3, 5])).tolist() == [
        cropping.certificate(np.array([5, 5]), n, p)] * 2 == [0.0, 0.0]


@pytest.mark.parametrize("replace,exhaustive", [(True, False), (True, True)])
def test_plain_reference_counts_near_ties_identically(replace, exhaustive):
    from certinfer.bench.cropping_reference import certify_reference

    rng = np.random.default_rng(7)
    hw, crop = (16, 16), (6, 6)
    threat = parse("1x1,2x2", input_hw=hw)
    n = cropping.crop_locations(hw, crop) if exhaustive else 60
    logits = rng.normal(size=(8, n, 3)).astype(np.float32)
    logits[:, :, 0] += np.linspace(1, 6, 8, dtype=np.float32)[:, None]
    ties = rng.random((8, n)) < 0.05
    logits[:, :, 1] = np.where(ties, logits[:, :, 0] - 5e-4, logits[:, :, 1])
    votes = cropping.count_votes(logits.argmax(-1), 3)
    near = cropping.near_ties(logits, 1e-3)
    fast = cropping.vote_certificates(votes, hw, crop, threat, replace, 0.9, exhaustive, near.sum(axis=1))
    plain = cropping.vote_certificates(votes, hw, crop, threat, replace, 0.9, exhaustive)
    for i in range(len(logits)):
        slow = certify_reference(logits[i], hw, crop, threat, replace, 0.9, exhaustive, tolerance=1e-3)
        assert slow.per_rect == fast[i].per_rect and slow.certified == fast[i].certified
    assert sum(c.certified for c in fast) < sum(c.certified for c in plain)  # the near ties cost something here


class _BatchDependentEngine:
    """A crop classifier on a backend that rounds differently by batch: class 0 scores the crop's brightest
    channel-0 pixel, class 1 a constant that moves by ``EPS`` (well under half the tie tolerance) with the number
    of frames in the call, as a kernel chosen by batch size would."""

    name, precision, max_batch = "batch-dependent", "fp32", 1 << 20
    EPS = 2e-4

    def run(self, batch: np.ndarray) -> np.ndarray:
        frames = len(batch) // 100  # 12x12 input, 3x3 crops: 100 crops per frame
        logits = np.empty((len(batch), 2), np.float32)
        logits[:, 0] = batch[:, 0].max(axis=(1, 2))
        logits[:, 1] = 0.5 + (self.EPS if frames % 2 else -self.EPS)
        return logits


def _batch_dependent_certifier() -> cropping.CroppingCertifier:
    from types import SimpleNamespace

    manifest = {"defense": {"kind": "cropping", "params": {"crop": [3, 3], "mode": "exhaustive"}},
                "input": {"hw": [12, 12], "mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["rival", "label"]}}
    return cropping.CroppingCertifier(SimpleNamespace(manifest=manifest), {"model": _BatchDependentEngine()},
                                      parse("1x1", input_hw=(12, 12)))


def _near_tie_frames(rng: np.random.Generator, count: int) -> np.ndarray:
    """Frames whose rival pixels fill two columns (40 of the 100 crops vote for the rival: a vote gap of 20, 2
    more than one patch pixel's 9 crops can take) plus a few pixels a hair above the class-1 score (near ties)."""
    x = np.zeros((count, 3, 12, 12), np.float32)
    x[:, 0, :, [8, 11]] = 1.0
    for frame in x:
        for _ in range(rng.integers(0, 3)):
            i, j = rng.integers(0, 12), rng.integers(0, 6)
            frame[0, i, j] = 0.5 + 1e-4
    return x


def test_near_tie_crops_keep_cropping_sound_on_a_batch_dependent_backend():
    """The attack: certify each frame alone, then patch one pixel (to the rival's brightest value) at every
    location and classify the patched frame alongside another frame, where the backend rounds the other way.
    Certified frames never flip; counting near ties as safe (the rule switched off) certifies a frame the attack
    flips, so the test can tell."""
    cert = _batch_dependent_certifier()
    assert not cert.trusted and cert.batch_atol() == cert.tolerance / 2 > _BatchDependentEngine.EPS
    frames = _near_tie_frames(np.random.default_rng(0), 12)
    unsafe_certified = certified = 0
    for x in frames:
        features = cert.infer(x[None])
        verdict = cert.certify(features)[0]
        unsafe = cert.certify(dataclasses.replace(features, near=None))[0]
        flipped = False
        for i in range(12):
            for j in range(12):
                patched = x.copy()
                patched[0, i, j] = 1.0
                flipped |= cert.certify(cert.infer(np.stack([patched, x])))[0].label != verdict.label
        certified += verdict.certificate.certified
        assert not (verdict.certificate.certified and flipped)
        unsafe_certified += unsafe.certificate.certified and flipped
    assert certified > 0 and unsafe_certified > 0


def test_a_verified_backend_counts_no_near_ties():
    from types import SimpleNamespace

    cert = _batch_dependent_certifier()
    manifest = {**cert.manifest, "probe": {"exact_backends": ["batch-dependent"]}}
    trusted = cropping.CroppingCertifier(SimpleNamespace(manifest=manifest), cert.engines, cert.threat)
    assert trusted.trusted and trusted.batch_atol() == 0.0
    assert trusted.infer(_near_tie_frames(np.random.default_rng(1), 2)).near is None


def test_an_engine_below_fp32_gives_no_certificates():
    """The near-tie band is sized for fp32 rounding; an fp16 engine rounds far more, so it certifies nothing."""
    from types import SimpleNamespace

    class Half(_BatchDependentEngine):
        precision = "fp16"

    cert = _batch_dependent_certifier()
    half = cropping.CroppingCertifier(SimpleNamespace(manifest=cert.manifest), {"model": Half()}, cert.threat)
    assert half.needs_exact and not cert.needs_exact
    x = np.zeros((2, 3, 12, 12), np.float32)  # every crop votes "label": a gap of 100, certified at fp32
    assert all(d.certificate.certified for d in cert.certify(cert.infer(x)))
    decisions = half.certify(half.infer(x))
    assert [d.label for d in decisions] == [1, 1] and not any(d.certificate.certified for d in decisions)
    assert all("not certified" in d.reason for d in decisions)
