"""certinfer.runtime.geometry: affected ranges against brute force, and against a real torch conv stack.

Brute force never uses the interval-overlap formula: it marks the patch's pixels in an input mask padded on
both sides and asks, output by output, whether any marked pixel lies in that output's window
``[i*stride - padding, i*stride - padding + rf - 1]``.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from certinfer.runtime.geometry import Geometry

N_GEOMETRIES = 240


def conv_out(n: int, rf: int, s: int, p: int) -> int:
    return (n + 2 * p - rf) // s + 1


def brute_axis(rf: int, s: int, p: int, n_in: int, n_out: int, size: int) -> np.ndarray:
    """``hit[t, i]``: a patch of ``size`` pixels starting at input pixel ``t`` puts a pixel in output ``i``'s window."""
    starts = n_in - size + 1
    right = max(0, (n_out - 1) * s - p + rf - n_in)  # room for windows past the input (oversized outputs)
    mask = np.zeros((starts, p + n_in + right), dtype=bool)
    for t in range(starts):
        mask[t, p + t: p + t + size] = True
    # padded coordinate of input pixel x is x + p, so output i's window starts at padded i*s
    windows = sliding_window_view(mask, rf, axis=1)[:, ::s][:, :n_out]
    assert windows.shape[1] == n_out
    return windows.any(axis=2)


def brute_2d(g: Geometry, rect) -> tuple[list[tuple[int, int]], np.ndarray]:
    """For every location of ``rect``: the (H', W') mask of outputs whose 2-D window holds a patch pixel."""
    (h, w), (H, W) = rect, g.input_hw
    (p0, p1), (s0, s1), (k0, k1), (n0, n1) = g.padding, g.stride, g.rf, g.output_hw
    extra0 = max(0, (n0 - 1) * s0 - p0 + k0 - H)
    extra1 = max(0, (n1 - 1) * s1 - p1 + k1 - W)
    locs = [(t, l) for t in range(H - h + 1) for l in range(W - w + 1)]
    mask = np.zeros((len(locs), p0 + H + extra0, p1 + W + extra1), dtype=bool)
    for n, (t, l) in enumerate(locs):
        mask[n, p0 + t: p0 + t + h, p1 + l: p1 + l + w] = True
    windows = sliding_window_view(mask, (k0, k1), axis=(1, 2))[:, ::s0, ::s1][:, :n0, :n1]
    assert windows.shape[1:3] == (n0, n1)
    return locs, windows.any(axis=(3, 4))


def ranges_to_mask(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    i = np.arange(n)
    return (lo[:, None] <= i) & (i < hi[:, None])


def random_geometry(rng: np.random.Generator, max_in: int = 20) -> Geometry:
    rf, s, p, n_in, n_out = [], [], [], [], []
    for _ in range(2):
        r = int(rng.integers(1, 10))
        st = int(rng.integers(1, 4))
        pd = int(rng.integers(0, r + 1))
        ni = int(rng.integers(5, max_in + 1))
        formula = conv_out(ni, r, st, pd)
        kind = rng.random()
        if formula >= 1 and kind < 0.6:
            no = formula  # what the conv stack really produces
        elif formula > 1 and kind < 0.8:
            no = int(rng.integers(1, formula))  # smaller: clipping at the high end
        else:
            no = int(rng.integers(max(formula, 1), max(formula, 1) + 8))  # larger than the formula
        rf.append(r), s.append(st), p.append(pd), n_in.append(ni), n_out.append(no)
    return Geometry(rf=rf, stride=s, padding=p, input_hw=n_in, output_hw=n_out)


def random_rects(rng: np.random.Generator, g: Geometry, k: int = 4) -> list[tuple[int, int]]:
    H, W = g.input_hw
    rects = [(1, 1), (H, W)]
    rects += [(int(rng.integers(1, H + 1)), int(rng.integers(1, W + 1))) for _ in range(k)]
    return rects


GEOMETRIES = [random_geometry(np.random.default_rng(1000 + k)) for k in range(N_GEOMETRIES)]


def test_geometry_sample_covers_the_cases():
    sizes = [(g.output_hw[a], conv_out(g.input_hw[a], g.rf[a], g.stride[a], g.padding[a]))
             for g in GEOMETRIES for a in (0, 1)]
    assert sum(o == f for o, f in sizes) > 100
    assert sum(o < f for o, f in sizes) > 20
    assert sum(o > f for o, f in sizes) > 20
    assert {g.stride[0] for g in GEOMETRIES} == {1, 2, 3}
    assert {g.rf[0] for g in GEOMETRIES} == set(range(1, 10))
    assert any(g.padding[0] == g.rf[0] for g in GEOMETRIES) and any(g.padding[0] == 0 for g in GEOMETRIES)


@pytest.mark.parametrize("k", range(N_GEOMETRIES))
def test_affected_ranges_match_brute_force(k):
    g = GEOMETRIES[k]
    rng = np.random.default_rng(k)
    for h, w in random_rects(rng, g):
        (r0, r1), (c0, c1) = g.affected_ranges((h, w))
        assert r0.shape == r1.shape == (g.input_hw[0] - h + 1,)
        assert c0.shape == c1.shape == (g.input_hw[1] - w + 1,)
        for lo, hi, a, size in ((r0, r1, 0, h), (c0, c1, 1, w)):
            n = g.output_hw[a]
            assert np.issubdtype(lo.dtype, np.integer) and np.issubdtype(hi.dtype, np.integer)
            assert np.all(0 <= lo) and np.all(lo <= hi) and np.all(hi <= n)  # half-open, clipped
            want = brute_axis(g.rf[a], g.stride[a], g.padding[a], g.input_hw[a], n, size)
            got = ranges_to_mask(lo, hi, n)
            bad = np.argwhere(got != want)
            assert bad.size == 0, (g, (h, w), a, bad[:5])
            empty = ~want.any(axis=1)
            assert np.all(lo[empty] == hi[empty])  # an empty range is lo == hi
        # the 2-D set is the grid rows x cols: spot-check affected() at random locations
        for _ in range(6):
            t = int(rng.integers(0, g.input_hw[0] - h + 1))
            l = int(rng.integers(0, g.input_hw[1] - w + 1))
            rows, cols = g.affected((h, w), (t, l))
            assert rows == (int(r0[t]), int(r1[t])) and cols == (int(c0[l]), int(c1[l]))
            assert all(isinstance(v, int) for v in rows + cols)
        # max_affected: the largest number of outputs any location of this patch touches
        per_loc = np.outer(r1 - r0, c1 - c0)
        assert g.max_affected((h, w)) == int(per_loc.max())


@pytest.mark.parametrize("k", range(60))
def test_affected_matches_2d_brute_force_at_every_location(k):
    rng = np.random.default_rng(5000 + k)
    g = random_geometry(rng, max_in=12)
    for rect in random_rects(rng, g, k=3):
        locs, want = brute_2d(g, rect)
        for n, loc in enumerate(locs):
            (a, b), (c, d) = g.affected(rect, loc)
            got = np.zeros(g.output_hw, dtype=bool)
            got[a:b, c:d] = True
            assert 0 <= a <= b <= g.output_hw[0] and 0 <= c <= d <= g.output_hw[1]
            assert np.array_equal(got, want[n]), (g, rect, loc)
        assert g.max_affected(rect) == int(want.sum(axis=(1, 2)).max())


def test_known_values():
    g = Geometry(rf=(7, 7), stride=(1, 1), padding=(3, 3), input_hw=(32, 32), output_hw=(32, 32))
    # output i sees [i - 3, i + 3]: a 5-pixel patch at t reaches outputs t - 3 .. t + 7 inclusive
    assert g.affected((5, 5), (0, 0)) == ((0, 8), (0, 8))  # clipped at 0
    assert g.affected((5, 5), (10, 20)) == ((7, 18), (17, 28))
    assert g.affected((5, 5), (27, 27)) == ((24, 32), (24, 32))
    assert g.max_affected((5, 5)) == 11 * 11
    # stride 2, rf 3, padding 1: output i sees [2i - 1, 2i + 1]
    g = Geometry(rf=(3, 3), stride=(2, 2), padding=(1, 1), input_hw=(8, 8), output_hw=(4, 4))
    assert g.affected((1, 1), (0, 0)) == ((0, 1), (0, 1))
    assert g.affected((1, 1), (1, 1)) == ((0, 2), (0, 2))  # pixel 1 is in windows [-1, 1] and [1, 3]
    assert g.affected((1, 1), (2, 2)) == ((1, 2), (1, 2))
    assert g.affected((1, 1), (7, 7)) == ((3, 4), (3, 4))
    # BagNet-like: rf 9, stride 8, no padding, 224 -> 27
    g = Geometry(rf=(9, 9), stride=(8, 8), padding=(0, 0), input_hw=(224, 224), output_hw=(27, 27))
    assert g.affected((1, 1), (8, 8)) == ((0, 2), (0, 2))
    assert g.affected((1, 1), (9, 9)) == ((1, 2), (1, 2))
    assert g.affected((1, 1), (223, 223)) == ((27, 27), (27, 27))  # beyond the last window: empty


def test_outputs_beyond_formula_and_clipping():
    # the last windows lie past the input: no patch can reach them
    g = Geometry(rf=(3, 3), stride=(1, 1), padding=(0, 0), input_hw=(5, 5), output_hw=(10, 10))
    (r0, r1), _ = g.affected_ranges((1, 1))
    assert list(r0) == [0, 0, 0, 1, 2] and list(r1) == [1, 2, 3, 4, 5]
    # fewer outputs than the formula: ranges clipped to the output, possibly empty
    g = Geometry(rf=(3, 3), stride=(1, 1), padding=(1, 1), input_hw=(10, 10), output_hw=(2, 2))
    (r0, r1), _ = g.affected_ranges((1, 1))
    # output i sees [i - 1, i + 1]: pixel t reaches outputs t - 1 .. t + 1, of which only 0 and 1 exist
    assert list(r0) == [0, 0, 1] + [2] * 7 and list(r1) == [2] * 10


def test_errors_and_serialization():
    g = Geometry(rf=(7, 5), stride=(1, 2), padding=(3, 2), input_hw=(32, 30), output_hw=(32, 15))
    assert Geometry.from_dict(g.to_dict()) == g
    assert g.to_dict() == {"rf": [7, 5], "stride": [1, 2], "padding": [3, 2], "input_hw": [32, 30],
                           "output_hw": [32, 15]}
    assert Geometry(rf=[7, 5], stride=np.array([1, 2]), padding=(3, 2), input_hw=(32, 30),
                    output_hw=(32, 15)) == g
    with pytest.raises(ValueError):
        g.affected_ranges((33, 1))
    with pytest.raises(ValueError):
        g.affected_ranges((1, 31))
    g.affected_ranges((32, 30))
    for bad in ({"rf": (0, 1)}, {"stride": (1, 0)}, {"padding": (-1, 0)}, {"input_hw": (0, 4)},
                {"output_hw": (4, 0)}):
        kw = dict(rf=(3, 3), stride=(1, 1), padding=(1, 1), input_hw=(8, 8), output_hw=(8, 8)) | bad
        with pytest.raises(ValueError):
            Geometry(**kw)


# ---------------------------------------------------------------- a real torch conv stack

# torch is only in the `train` extra: only these tests need it, the brute-force ones above run without it.


def compose(layers):
    """Effective (rf, stride, padding) of a chain of (kernel, stride, padding) along one axis."""
    rf, s, p = 1, 1, 0
    for k, st, pd in layers:
        rf, p, s = rf + (k - 1) * s, p + pd * s, s * st
    return rf, s, p


def _changed_sets(model, x, g: Geometry, rect, gen):
    """Perturb ``rect`` at every location (one batch); return the locations and, per location, which outputs moved."""
    import torch

    h, w = rect
    H, W = g.input_hw
    locs = [(t, l) for t in range(H - h + 1) for l in range(W - w + 1)]
    xb = x.repeat(len(locs), 1, 1, 1)
    for n, (t, l) in enumerate(locs):
        xb[n, :, t:t + h, l:l + w] += 3.0 * torch.randn(x.shape[1], h, w, generator=gen, dtype=x.dtype)
    with torch.no_grad():
        # the same batch size for both: a different batch size may pick a different kernel (other rounding)
        base = model(x.repeat(len(locs), 1, 1, 1))
        out = model(xb)
    assert tuple(out.shape[2:]) == g.output_hw
    changed = (out != base).any(dim=1).numpy()  # (L, H', W')
    return locs, changed


STACKS = {
    # Conv 3x3 p1 -> conv 3x3 s2 p1 -> 1x1: output i sees layer-1 [2i-1, 2i+1], i.e. input [2i-2, 2i+2]
    "square": dict(
        layers=lambda nn: [nn.Conv2d(3, 4, 3, padding=1), nn.LeakyReLU(0.1),
                           nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
                           nn.Conv2d(4, 4, 1)],
        per_axis=[[(3, 1, 1), (3, 2, 1), (1, 1, 0)]] * 2,
        by_hand=dict(rf=(5, 5), stride=(2, 2), padding=(2, 2)),
        input_hw=(16, 16), output_hw=(8, 8)),
    # rows: 3 p0 then 3 s2 p1 -> input [2i-1, 2i+3]; cols: 5 s2 p2 then 3 s2 p1 -> input [4j-4, 4j+4]
    "asymmetric": dict(
        layers=lambda nn: [nn.Conv2d(3, 4, (3, 5), stride=(1, 2), padding=(0, 2)), nn.LeakyReLU(0.1),
                           nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.1),
                           nn.Conv2d(4, 5, 1)],
        per_axis=[[(3, 1, 0), (3, 2, 1), (1, 1, 0)], [(5, 2, 2), (3, 2, 1), (1, 1, 0)]],
        by_hand=dict(rf=(5, 9), stride=(2, 4), padding=(1, 4)),
        input_hw=(16, 20), output_hw=(7, 5)),
}


@pytest.mark.parametrize("name", sorted(STACKS))
def test_real_conv_stack(name):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = STACKS[name]
    model = torch.nn.Sequential(*spec["layers"](torch.nn)).double().eval()
    assert tuple(compose(spec["per_axis"][0])) == (spec["by_hand"]["rf"][0], spec["by_hand"]["stride"][0],
                                                    spec["by_hand"]["padding"][0])
    assert tuple(compose(spec["per_axis"][-1])) == (spec["by_hand"]["rf"][1], spec["by_hand"]["stride"][1],
                                                     spec["by_hand"]["padding"][1])
    g = Geometry(input_hw=spec["input_hw"], output_hw=spec["output_hw"], **spec["by_hand"])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, *g.input_hw, generator=gen, dtype=torch.float64)
    for rect in [(1, 1), (2, 3), (3, 2), (5, 5), (g.input_hw[0], 1), (4, g.input_hw[1])]:
        locs, changed = _changed_sets(model, x, g, rect, gen)
        (r0, r1), (c0, c1) = g.affected_ranges(rect)
        for n, (t, l) in enumerate(locs):
            allowed = np.zeros(g.output_hw, dtype=bool)
            allowed[r0[t]:r1[t], c0[l]:c1[l]] = True
            assert g.affected(rect, (t, l)) == ((r0[t], r1[t]), (c0[l], c1[l]))
            # soundness: nothing outside the affected ranges ever changes (bit for bit)
            assert not np.any(changed[n] & ~allowed), (name, rect, (t, l))
            # exactness: a random perturbation reaches every affected output (the ranges are not loose)
            assert np.array_equal(changed[n], allowed), (name, rect, (t, l))
        assert changed.sum(axis=(1, 2)).max() == g.max_affected(rect)


def test_real_conv_stack_float32_outside_is_bit_identical():
    # the deployed dtype: outputs outside the affected ranges must not move by a single ulp
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    torch.manual_seed(2)
    spec = STACKS["square"]
    model = torch.nn.Sequential(*spec["layers"](torch.nn)).eval()
    g = Geometry(input_hw=spec["input_hw"], output_hw=spec["output_hw"], **spec["by_hand"])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, *g.input_hw, generator=gen)
    rect = (3, 3)
    locs, changed = _changed_sets(model, x, g, rect, gen)
    (r0, r1), (c0, c1) = g.affected_ranges(rect)
    some_inside = False
    for n, (t, l) in enumerate(locs):
        allowed = np.zeros(g.output_hw, dtype=bool)
        allowed[r0[t]:r1[t], c0[l]:c1[l]] = True
        assert not np.any(changed[n] & ~allowed), (rect, (t, l))
        some_inside |= bool(changed[n].any())
    assert some_inside
