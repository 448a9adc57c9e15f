"""PatchGuard robust masking: vectorized math against loops, feature-space attacks, the single-window trap."""

import itertools

import numpy as np
import pytest

from certinfer.bench.masking_reference import all_windows, certify_reference, evidence_reference
from certinfer.runtime import ablation
from certinfer.runtime.defenses import masking
from certinfer.runtime.defenses.masking import TANH, MaskingOptions
from certinfer.runtime.geometry import Geometry
from certinfer.threat import parse, rect_key

SETTINGS = {
    "mask-bn": MaskingOptions("logits", 0.0, (0.0, masking.INF)),
    "mask-bn-T0.2": MaskingOptions("logits", 0.2, (0.0, masking.INF)),
    "mask-bn-clip15": MaskingOptions("logits", 0.5, (0.0, 15.0)),
    "cbn": MaskingOptions("logits", 1.0, TANH),
    "mask-ds": MaskingOptions("confidence", 0.0, (0.0, 1.0)),
    "drs": MaskingOptions("prediction", 1.0, (0.0, 1.0), abstain=0.3),
}


def random_case(rng, strong: float = 2.0):
    rf, stride = int(rng.integers(1, 5)), int(rng.integers(1, 3))
    pad = int(rng.integers(0, rf))
    n = int(rng.integers(7, 12))
    out = (n + 2 * pad - rf) // stride + 1
    g = Geometry((rf, rf), (stride, stride), (pad, pad), (n, n), (out, out))
    c = int(rng.integers(2, 5))
    z = rng.normal(size=g.output_hw + (c,))
    z[..., 0] += rng.uniform(0, strong)  # class 0 strong enough that some cases certify
    return g, z


def _kw(agg: MaskingOptions) -> dict:
    return dict(threshold=agg.threshold, clip=agg.clip, feature=agg.feature, abstain=agg.abstain)


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("seed", range(12))
def test_certify_equals_loops(name, seed):
    rng = np.random.default_rng(seed)
    g, z = random_case(rng, strong=4.0 if name in ("cbn", "drs") else 2.0)
    agg = SETTINGS[name]
    threat = parse("2x2,1x3" if seed % 2 else "2x2", input_hw=g.input_hw)
    label = masking.robust_predict(z, g, threat, **_kw(agg))
    ref = evidence_reference(agg.features(z), g, threat.rects, agg.threshold)
    assert np.allclose(masking.evidence(agg.features(z)[None], g, threat, agg.threshold)[0], ref, atol=1e-9)
    if np.sort(ref)[-1] - np.sort(ref)[-2] > 1e-9:  # near-ties may go either way in floating point
        assert label == int(ref.argmax())
    fast = masking.certify(z, label, g, threat, **_kw(agg))
    slow = certify_reference(z, label, g, threat, agg)
    for k in slow.per_rect:
        assert fast.per_rect[k].certified == slow.per_rect[k].certified
        assert np.isclose(fast.per_rect[k].margin, slow.per_rect[k].margin, rtol=1e-9, atol=1e-9) or \
            (slow.per_rect[k].margin == -np.inf and fast.per_rect[k].margin < -1e300)


def test_some_cases_certify_and_some_do_not():
    outcomes = set()
    for seed in range(40):
        g, z = random_case(np.random.default_rng(seed))
        outcomes.add(masking.certify(z, 0, g, parse("2x2"), threshold=0.0).certified)
    assert outcomes == {True, False}


def test_batch_matches_single():
    rng = np.random.default_rng(3)
    g, _ = random_case(rng)
    z = rng.normal(size=(6,) + g.output_hw + (3,))
    z[..., 1] += 1.5
    labels = masking.robust_predict(z, g, parse("2x2"))
    batch = masking.certify(z, labels, g, parse("2x2"))
    for i in range(6):
        assert masking.robust_predict(z[i], g, parse("2x2")) == labels[i]
        assert masking.certify(z[i], labels[i], g, parse("2x2")) == batch[i]


def _attacks(z: np.ndarray, window: np.ndarray, target: int, label: int, agg: MaskingOptions):
    """Adversarial local logits inside ``window``: magnitudes from undetectably small to huge, several shapes."""
    cells = np.argwhere(window)
    for v, shape in itertools.product((1e-3, 0.05, 0.3, 1.0, 3.0, 10.0, 100.0, 1e4), ("flat", "one", "ramp")):
        a = z.copy()
        weights = {"flat": np.ones(len(cells)), "one": np.eye(len(cells))[0],
                   "ramp": np.linspace(0.1, 1.0, len(cells))}[shape]
        for (i, j), wt in zip(cells, weights):
            a[i, j, :] = -1e4 if agg.feature != "logits" or agg.clip == TANH else -v  # every other class loses
            a[i, j, target] = v * wt if agg.feature == "logits" and agg.clip != TANH else 50.0 * wt
            a[i, j, label] = -1e4  # true class evidence removed where the attacker can
        yield a


@pytest.mark.parametrize("name", SETTINGS)
def test_feature_space_attacks_never_flip_a_certified_case(name):
    agg = SETTINGS[name]
    checked = 0
    for seed in range(30):
        g, z = random_case(np.random.default_rng(100 + seed), strong=6.0)
        threat = parse("2x2", input_hw=g.input_hw)
        label = masking.robust_predict(z, g, threat, **_kw(agg))
        if not masking.certify(z, label, g, threat, **_kw(agg)).certified:
            continue
        for window in {w.tobytes(): w for w in all_windows(g, threat.rects)}.values():
            for target in range(z.shape[-1]):
                if target == label:
                    continue
                for a in _attacks(z, window, target, label, agg):
                    assert masking.robust_predict(a, g, threat, **_kw(agg)) == label
                    checked += 1
    assert checked > 100, "too few certified cases to attack"


def test_certified_implies_clean_prediction():
    for seed in range(60):
        g, z = random_case(np.random.default_rng(seed))
        for c in range(z.shape[-1]):
            if masking.certify(z, c, g, parse("2x2")).certified:
                assert masking.robust_predict(z, g, parse("2x2")) == c


def test_cbn_is_the_clipped_bagnet_rule():
    """T = 1 with tanh clipping: certified exactly when O_y - O_c > 2|w| at every window (Zhang et al.)."""
    for seed in range(30):
        g, z = random_case(np.random.default_rng(seed), strong=8.0)
        threat = parse("2x2", input_hw=g.input_hw)
        u = np.tanh(0.05 * z - 1.0)
        ok = True
        for w in all_windows(g, threat.rects):
            out = u[~w].sum(axis=0)
            ok &= bool(out[0] - np.delete(out, 0).max() > 2 * w.sum())
        assert masking.certify(z, 0, g, threat, threshold=1.0, clip=TANH).certified == ok


def test_drs_bound_is_never_looser_than_the_count_rule():
    """Whenever DRS's rule (top count beats the runner-up by more than 2k) certifies, so does ours."""
    g = ablation.geometry((12, 12), "column", 3)
    k = g.max_affected((3, 3))
    seen = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        votes = rng.choice(3, size=g.output_hw, p=[0.75, 0.15, 0.1])
        z = np.eye(3)[votes] * 10.0
        counts = np.bincount(votes.ravel(), minlength=3)
        if counts[0] - np.sort(counts)[-2] > 2 * k:
            seen += 1
            assert masking.certify(z, 0, g, parse("3x3"), threshold=1.0, clip=(0.0, 1.0), feature="prediction").certified
    assert seen > 10


def test_ties_are_flips():
    g = Geometry((1, 1), (1, 1), (0, 0), (1, 4), (1, 4))
    # true class 0 keeps 1 outside any 1-cell window at worst; class 1 can reach exactly that: a tie
    z = np.zeros((1, 4, 2))
    z[0, :, 0] = [1.0, 1.0, 0.0, 0.0]
    z[0, :, 1] = [0.0, 0.0, 0.0, 0.0]
    cert = masking.certify(z, 0, g, parse("1x1"), threshold=1.0, clip=(0.0, 1.0), feature="logits")
    assert cert.per_rect["1x1"].margin == 0.0 and not cert.certified


# --- Algorithm 1 read literally: one window, chosen on the undefended prediction, masked for all classes ---

def _literal_algorithm_1(u: np.ndarray, detect: list[np.ndarray], T: float) -> int:
    """Xiang et al. Algorithm 1 as printed (u: clipped features, the model aggregates them by sum)."""
    y_bar = int(u.sum(axis=(0, 1)).argmax())
    sums = [u[..., y_bar][w].sum() for w in detect]
    best = int(np.argmax(sums))
    if sums[best] / u[..., y_bar].sum() <= T:
        return y_bar
    return int((u * ~detect[best][..., None]).sum(axis=(0, 1)).argmax())


def _literal_algorithm_2(u: np.ndarray, y: int, detect: list[np.ndarray], T: float) -> bool:
    """Xiang et al. Algorithm 2 as printed (NOWINDOW, BENIGNWINDOW, PARTMALWINDOW)."""
    if int(u.sum(axis=(0, 1)).argmax()) != y:
        return False
    for t in range(u.shape[-1]):
        if t == y:
            continue
        uy, ut = u[..., y], u[..., t]
        for w in detect:
            delta = ((uy - ut) * ~w).sum()
            s1 = delta / ((ut * ~w).sum() + delta) if delta else 0.0
            benign = [d for d in detect if not (d & w).any()]
            s2 = uy[max(benign, key=lambda d: ut[d].sum())].sum() if benign else 0.0
            part = [d for d in detect if (d & w).any()]
            s3 = max((uy * (d & ~w)).sum() for d in part)
            if s1 < T or s2 > delta or s3 > delta or delta < 0:
                return False
    return True


def test_single_window_reading_is_not_covered_by_algorithm_2():
    """A case the printed Algorithm 2 certifies, flipped by an attack on the printed Algorithm 1.

    One row of five features, 1-cell windows, T = 0. The attacker writes class 1 evidence A = 6 into the last
    cell: the undefended prediction stays class 0 (10 vs 9.5), so the detector masks class 0's strongest
    (benign) cell for every class, and class 1 then wins 6.5 to 6. Per-class masking certifies this case and
    no attack in the same grid flips it.
    """
    g = Geometry((1, 1), (1, 1), (0, 0), (1, 5), (1, 5))
    threat = parse("1x1", input_hw=g.input_hw)
    detect = all_windows(g, threat.rects)
    u = np.zeros((1, 5, 2))
    u[0, :, 0] = [4.0, 2.0, 2.0, 2.0, 0.0]
    u[0, :, 1] = [3.0, 0.0, 0.0, 0.5, 0.0]
    assert _literal_algorithm_2(u, 0, detect, 0.0)
    assert masking.certify(u, 0, g, threat).certified

    flips_literal, flips_ours = [], []
    grid = np.linspace(0.0, 12.0, 49)
    for cell in range(5):
        for a_true, a_target in itertools.product(grid, grid):
            x = u.copy()
            x[0, cell] = [a_true, a_target]
            if _literal_algorithm_1(x, detect, 0.0) != 0:
                flips_literal.append((cell, a_true, a_target))
            if masking.robust_predict(x, g, threat) != 0:
                flips_ours.append((cell, a_true, a_target))
    assert (4, 0.0, 6.0) in flips_literal
    assert flips_ours == []


# --- ablation geometry: the kept pixels are exactly each output's receptive field ---

@pytest.mark.parametrize("mode,size,stride", [("column", 4, 1), ("column", 3, 2), ("block", 3, 1), ("block", 4, 3)])
def test_ablation_masks_match_geometry(mode, size, stride):
    g = ablation.geometry((10, 9), mode, size, stride)
    m = ablation.masks(g).reshape(*g.output_hw, 10, 9)
    for h, w in ((1, 1), (2, 3), (3, 2)):
        for top, left in itertools.product(range(10 - h + 1), range(9 - w + 1)):
            patch = np.zeros((10, 9), bool)
            patch[top:top + h, left:left + w] = True
            touched = (m.astype(bool) & patch).any(axis=(2, 3))
            (r0, r1), (c0, c1) = g.affected((h, w), (top, left))
            expected = np.zeros(g.output_hw, bool)
            expected[r0:r1, c0:c1] = True
            assert (touched == expected).all()
    assert (m.sum(axis=(0, 1)) > 0).all(), "every pixel is kept by some ablation"


def test_ablation_batch_layout():
    g = ablation.geometry((6, 6), "column", 2)
    x = np.random.default_rng(0).random((3, 3, 6, 6)).astype(np.float32)
    b = ablation.batch(x, g).reshape(3, -1, 4, 6, 6)
    assert b.shape[1] == g.output_hw[0] * g.output_hw[1]
    assert (b[:, :, :3] == x[:, None]).all() and (b[1, :, 3] == ablation.masks(g)).all()


def test_rejects_masking_with_negative_features():
    with pytest.raises(ValueError, match="non-negative"):
        MaskingOptions("logits", 0.0, TANH)
    with pytest.raises(ValueError, match="feature"):
        MaskingOptions("votes")


def test_margin_keys_and_json_safe_for_unbounded_gain():
    g, z = random_case(np.random.default_rng(1))
    cert = masking.certify(z, 0, g, parse("2x2"), threshold=1.0, clip=(0.0, masking.INF))
    assert not cert.certified and np.isfinite(cert.per_rect[rect_key((2, 2))].margin)


@pytest.mark.parametrize("candidates", [1, 3, 8])
def test_pruned_remaining_evidence_equals_every_window(monkeypatch, candidates):
    """The candidate pruning of R_y(w) gives exactly the minimum over every window, whichever path it takes."""
    from certinfer.runtime import sat

    monkeypatch.setattr(masking, "_CANDIDATES", candidates)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        g, z = random_case(rng)
        u = np.clip(z, 0, None)[None]
        threat = parse("2x2,1x3", input_hw=g.input_hw)
        detect = [masking.windows(g, r) for r in threat.rects]
        ty = sat.table(u)[..., 0]
        for attack in detect:
            base = rng.normal(size=(1, len(attack[0][0]), len(attack[1][0]))) * 3
            full = (base - masking._remaining_max(ty, attack, detect)).min(axis=(1, 2))
            assert np.allclose(masking._masked_margin(base, ty, attack, detect), full, rtol=0, atol=1e-12)


class _MapEngine:
    """A stand-in local-logits engine: class 0 everywhere, strongly enough to certify 1x1 patches (CBN too)."""

    max_batch = 1 << 20

    def __init__(self, name: str, out_hw: tuple[int, int], precision: str = "fp32"):
        self.name, self.precision, self.out_hw = name, precision, out_hw

    def run(self, batch: np.ndarray) -> np.ndarray:
        z = np.zeros((len(batch), *self.out_hw, 3), np.float32)
        z[..., 0] = 40.0
        return z


def _masking_certifier(engine, exact=("onnxruntime-cpu",), **params) -> masking.MaskingCertifier:
    from types import SimpleNamespace

    g = Geometry((3, 3), (1, 1), (1, 1), (8, 8), (8, 8))
    manifest = {"defense": {"kind": "masking", "params": {**masking.VARIANTS["mask-bn"], **params}},
                "input": {"hw": [8, 8], "mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["a", "b", "c"]},
                "geometry": g.to_dict(), "probe": {"exact_backends": list(exact)}}
    threat = parse("1x1", input_hw=(8, 8))
    return masking.MaskingCertifier(SimpleNamespace(manifest=manifest), {"model": engine}, threat)


def test_certifier_variants_share_features_and_local_logits_need_an_exact_fp32_backend():
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    cert = _masking_certifier(_MapEngine("onnxruntime-cpu", (8, 8)))
    assert cert.needs_exact and cert.trusted and cert.options == MaskingOptions.from_params(masking.VARIANTS["mask-bn"])
    features = cert.infer(cert.prepare(frames))
    cbn = cert.with_options(**vars(MaskingOptions.from_params(masking.VARIANTS["cbn"])))
    assert cbn.infer_key() == cert.infer_key() and cbn.options.clip == TANH
    for bn, tanh in zip(cert.certify(features), cbn.certify(features)):
        assert bn.label == tanh.label == 0 and bn.certificate.certified and tanh.certificate.certified
    assert cert.certify(features, cbn.options)[0].certificate == cbn.certify(features)[0].certificate
    for engine, exact in ((_MapEngine("onnxruntime-cuda", (8, 8)), ("onnxruntime-cpu",)),
                          (_MapEngine("onnxruntime-cpu", (8, 8), precision="fp16"), ("onnxruntime-cpu",))):
        loose = _masking_certifier(engine, exact)
        assert not loose.trusted
        (v,) = loose(frames[:1])
        assert v.label == 0 and v.status == "uncertified" and "not certified" in v.reason
        assert all(r.margin <= 0 for r in v.certificate.per_rect.values())
    with pytest.raises(ValueError, match="non-negative"):
        cert.with_options(clip=TANH)  # masking (T = 0) on tanh features


def test_ablation_certificates_need_a_verified_fp32_backend():
    """Ablated pixels are multiplied by 0 (locality holds anywhere), but a patched frame's ablations run in
    another batch, so an ablation's output must not depend on its batch: only verified backends certify."""
    from types import SimpleNamespace

    class Base:  # a base classifier voting class 0 for every ablation
        name, precision, max_batch = "onnxruntime-cuda", "fp32", 1 << 20

        def run(self, batch: np.ndarray) -> np.ndarray:
            return np.tile(np.array([[3.0, 0.0, 0.0]], np.float32), (len(batch), 1))

    g = ablation.geometry((8, 8), "column", 2)
    manifest = {"defense": {"kind": "masking", "params": {**masking.VARIANTS["drs"], "source": "ablation",
                                                          "ablation": {"mode": "column", "size": 2}}},
                "input": {"hw": [8, 8], "mean": [0.0] * 3, "std": [1.0] * 3, "classes": ["a", "b", "c"]},
                "geometry": g.to_dict(), "probe": {"exact_backends": ["onnxruntime-cuda"]}}
    frame = np.zeros((1, 8, 8, 3), np.uint8)
    cert = masking.MaskingCertifier(SimpleNamespace(manifest=manifest), {"model": Base()}, parse("1x1"))
    assert cert.trusted and cert.needs_exact
    (v,) = cert(frame)
    assert v.status == "certified" and v.reason == "" and v.scores == [9.0, 0.0, 0.0]
    manifest["probe"]["exact_backends"] = []
    unlisted = masking.MaskingCertifier(SimpleNamespace(manifest=manifest), {"model": Base()}, parse("1x1"))
    (v,) = unlisted(frame)
    assert v.status == "uncertified" and "is not verified for this bundle" in v.reason and v.label == 0
