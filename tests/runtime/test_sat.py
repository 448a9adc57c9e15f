"""certinfer.runtime.sat: summed-area tables and window sums against direct numpy sums."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from certinfer.runtime import sat
from certinfer.runtime.geometry import Geometry

SHAPES = [(1, 1, 1), (5, 7, 3), (12, 9, 10), (3, 1, 4), (1, 6, 2),
          (2, 6, 5, 3), (4, 8, 8, 1), (2, 3, 5, 4, 2), (0, 4, 4, 2)]
KINDS = ["bool", "uint8", "int32", "int64", "float32", "float64"]


def random_map(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    if kind == "bool":
        return rng.random(shape) < 0.4
    if kind == "uint8":
        return rng.integers(0, 256, shape).astype(np.uint8)
    if kind == "int32":
        return rng.integers(-2 ** 31, 2 ** 31, shape, dtype=np.int64).astype(np.int32)
    if kind == "int64":
        return rng.integers(-10 ** 12, 10 ** 12, shape, dtype=np.int64)
    return rng.normal(0, 10, shape).astype(kind)


def seed(*key) -> int:
    return zlib.crc32(repr(key).encode())  # stable across runs (str hashes are salted per process)


def random_ranges(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` random half-open ranges inside ``[0, n]``, varying sizes, with empty ones mixed in."""
    lo = rng.integers(0, n + 1, k)
    hi = lo + rng.integers(0, n + 1, k)
    hi = np.minimum(hi, n)
    empty = rng.random(k) < 0.2
    hi[empty] = lo[empty]
    # always include the extremes: the whole axis, and empty ranges at both ends
    lo = np.concatenate([lo, [0, 0, n]])
    hi = np.concatenate([hi, [n, 0, n]])
    return lo, hi


def direct_sums(x: np.ndarray, rows, cols, dtype) -> np.ndarray:
    out = np.zeros(x.shape[:-3] + (len(rows[0]), len(cols[0]), x.shape[-1]), dtype=dtype)
    for k, (a, b) in enumerate(zip(*rows)):
        for l, (c, d) in enumerate(zip(*cols)):
            out[..., k, l, :] = x[..., a:b, c:d, :].astype(dtype).sum(axis=(-3, -2))
    return out


def acc_dtype(kind: str):
    return np.float64 if kind.startswith("float") else np.int64


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_table(shape, kind):
    rng = np.random.default_rng(seed(shape, kind))
    x = random_map(rng, shape, kind)
    t = sat.table(x)
    H, W = shape[-3], shape[-2]
    assert t.shape == shape[:-3] + (H + 1, W + 1, shape[-1])
    assert t.dtype == acc_dtype(kind)
    assert np.all(t[..., 0, :, :] == 0) and np.all(t[..., :, 0, :] == 0)
    for i in range(H + 1):
        for j in range(W + 1):
            want = x[..., :i, :j, :].astype(acc_dtype(kind)).sum(axis=(-3, -2))
            if kind.startswith("float"):
                np.testing.assert_allclose(t[..., i, j, :], want, rtol=1e-12, atol=1e-9)
            else:
                np.testing.assert_array_equal(t[..., i, j, :], want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_window_sums(shape, kind):
    rng = np.random.default_rng(seed(shape, kind, "w"))
    x = random_map(rng, shape, kind)
    t = sat.table(x)
    H, W = shape[-3], shape[-2]
    for _ in range(3):
        rows = random_ranges(rng, H, int(rng.integers(1, 8)))
        cols = random_ranges(rng, W, int(rng.integers(1, 8)))
        got = sat.window_sums(t, rows, cols)
        want = direct_sums(x, rows, cols, acc_dtype(kind))
        assert got.shape == shape[:-3] + (len(rows[0]), len(cols[0]), shape[-1])
        assert got.dtype == acc_dtype(kind)
        if kind.startswith("float"):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9)
        else:
            np.testing.assert_array_equal(got, want)  # integer maps: exact
        # empty windows sum to exactly zero, whatever the dtype
        empty = np.logical_or.outer(rows[1] == rows[0], cols[1] == cols[0])
        assert empty.any()
        assert np.all(got[..., empty, :] == 0)


def test_window_sums_lists_and_single_windows():
    x = np.arange(4 * 5 * 2).reshape(4, 5, 2)
    t = sat.table(x)
    got = sat.window_sums(t, ([1], [3]), ([0], [5]))
    np.testing.assert_array_equal(got, x[1:3, 0:5].sum(axis=(0, 1))[None, None])
    got = sat.window_sums(t, ([0, 2], [4, 2]), ([1, 0], [2, 5]))  # plain lists, one empty row range
    np.testing.assert_array_equal(got[0, 0], x[0:4, 1:2].sum(axis=(0, 1)))
    np.testing.assert_array_equal(got[0, 1], x.sum(axis=(0, 1)))
    assert np.all(got[1] == 0)


def test_integer_exact_where_float_would_not_be():
    # values near 2**55: float64 sums would drop low bits; int64 tables must stay exact (36 * 2**55 < 2**63)
    rng = np.random.default_rng(7)
    x = rng.integers(2 ** 54, 2 ** 55, (6, 6, 2), dtype=np.int64)
    x[0, 0, 0] = 1
    t = sat.table(x)
    rows, cols = (np.arange(6), np.arange(6) + 1), (np.zeros(6, int), np.full(6, 6))
    got = sat.window_sums(t, rows, cols)
    want = np.array([[x[a:b, c:d].sum(axis=(0, 1)) for c, d in zip(*cols)] for a, b in zip(*rows)])
    np.testing.assert_array_equal(got, want)
    assert sat.table(np.ones((3, 3, 1), dtype=np.uint8) * 255)[..., 3, 3, 0] == 9 * 255  # no uint8 wrap
    assert sat.table(np.ones((20, 20, 1), dtype=bool))[..., 20, 20, 0] == 400  # no bool saturation


def test_window_sums_with_geometry_ranges():
    # the way certifiers use it: per-location affected ranges of a patch over a (N, H', W', C) score map
    rng = np.random.default_rng(11)
    g = Geometry(rf=(5, 7), stride=(2, 1), padding=(2, 3), input_hw=(16, 14), output_hw=(8, 14))
    x = rng.integers(0, 2, (3, 8, 14, 4)).astype(bool)
    t = sat.table(x)
    for rect in [(1, 1), (3, 5), (16, 14)]:
        rows, cols = g.affected_ranges(rect)
        got = sat.window_sums(t, rows, cols)
        np.testing.assert_array_equal(got, direct_sums(x, rows, cols, np.int64))
        sizes = sat.window_sizes(rows, cols)
        assert sizes.shape == (len(rows[0]), len(cols[0]))
        np.testing.assert_array_equal(sizes, sat.window_sums(sat.table(np.ones((8, 14, 1), int)), rows, cols)[..., 0])


def test_window_sizes():
    rng = np.random.default_rng(3)
    for _ in range(30):
        H, W = (int(v) for v in rng.integers(1, 15, 2))
        rows = random_ranges(rng, H, int(rng.integers(1, 6)))
        cols = random_ranges(rng, W, int(rng.integers(1, 6)))
        sizes = sat.window_sizes(rows, cols)
        assert sizes.shape == (len(rows[0]), len(cols[0]))
        for k, (a, b) in enumerate(zip(*rows)):
            for l, (c, d) in enumerate(zip(*cols)):
                assert sizes[k, l] == len(range(a, b)) * len(range(c, d)) == np.ones((H, W))[a:b, c:d].size
    np.testing.assert_array_equal(sat.window_sizes(([0, 1], [3, 1]), ([2], [4])), [[6], [0]])


def test_table_rejects_too_few_axes():
    with pytest.raises(ValueError):
        sat.table(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        sat.table(np.zeros(4))
