"""certinfer.threat: every spec form, round trips, clear errors, and a fuzz test that nothing else escapes."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certinfer.threat import Threat, ThreatError, parse, rect_key


def all_factor_pairs(area: int) -> list[tuple[int, int]]:
    return [(h, area // h) for h in range(1, area + 1) if area % h == 0]


def min_side_for_area(area: Fraction) -> int:
    """Brute force: the smallest square side whose area is at least ``area``."""
    side = 0
    while side * side < area:
        side += 1
    return side


# ---------------------------------------------------------------- spec forms

def test_rect():
    t = parse("5x5")
    assert isinstance(t, Threat)
    assert t.rects == ((5, 5),)
    assert t.keys == ("5x5",)
    assert parse("3x7").rects == ((3, 7),)  # (h, w) order
    assert parse("7x3").rects == ((7, 3),)
    assert parse("1x1").rects == ((1, 1),)


def test_rect_case_and_whitespace_are_normalized():
    assert parse(" 5X5 ").rects == ((5, 5),)
    assert str(parse(" 5X5 , AREA:4 ")) == "5x5,area:4"


def test_percent_on_32x32_is_5x5():
    assert parse("2.4%", input_hw=(32, 32)).rects == ((5, 5),)


@pytest.mark.parametrize("pct,hw,side", [
    ("1%", (32, 32), 4),          # 10.24 px -> 4x4 (16 >= 10.24, 9 < 10.24)
    ("100%", (32, 32), 32),
    ("25%", (32, 32), 16),        # exactly 256 px: no rounding up past an exact square
    ("2.44140625%", (32, 32), 5),  # exactly 25 px
    ("2.44140625000001%", (32, 32), 6),  # a hair over 25 px: rounded UP, never down
    ("0.5%", (224, 224), 16),     # 250.88 px -> 16x16
    ("2%", (224, 224), 32),       # 1003.52 px -> 32x32 (31^2 = 961)
    ("3%", (224, 224), 39),
])
def test_percent_side_rounded_up(pct, hw, side):
    assert parse(pct, input_hw=hw).rects == ((side, side),)


@pytest.mark.parametrize("hw", [(32, 32), (28, 28), (224, 224), (32, 64), (17, 23)])
@pytest.mark.parametrize("pct", ["0.1", "0.5", "1", "1.5", "2", "2.4", "3", "4", "6.25", "10", "33.3", "50"])
def test_percent_matches_exact_brute_force(pct, hw):
    need = Fraction(pct) / 100 * hw[0] * hw[1]
    side = min_side_for_area(need)
    if side > min(hw):
        with pytest.raises(ThreatError):
            parse(pct + "%", input_hw=hw)
    else:
        assert parse(pct + "%", input_hw=hw).rects == ((side, side),)
        assert side * side >= need > (side - 1) ** 2


def test_area_all_factor_pairs():
    t = parse("area:24")
    assert set(t.rects) == {(1, 24), (2, 12), (3, 8), (4, 6), (6, 4), (8, 3), (12, 2), (24, 1)}
    assert len(t.rects) == 8
    assert parse("area:1").rects == ((1, 1),)
    assert set(parse("area:36").rects) == set(all_factor_pairs(36))
    assert set(parse("area:13").rects) == {(1, 13), (13, 1)}


@pytest.mark.parametrize("area", list(range(1, 130)) + [720, 1024, 5040])
def test_area_without_input_matches_brute_force(area):
    rects = parse(f"area:{area}").rects
    assert sorted(rects) == all_factor_pairs(area)
    assert len(set(rects)) == len(rects)


@pytest.mark.parametrize("hw", [(32, 32), (5, 32), (32, 5), (7, 9), (1, 24), (24, 1)])
@pytest.mark.parametrize("area", [1, 6, 12, 24, 36, 60, 64, 100, 120])
def test_area_only_rects_that_fit(area, hw):
    want = [(h, w) for h, w in all_factor_pairs(area) if h <= hw[0] and w <= hw[1]]
    if not want:
        with pytest.raises(ThreatError, match="fits"):
            parse(f"area:{area}", input_hw=hw)
    else:
        assert sorted(parse(f"area:{area}", input_hw=hw).rects) == want


def test_area_fits_example():
    assert set(parse("area:24", input_hw=(5, 32)).rects) == {(1, 24), (2, 12), (3, 8), (4, 6)}
    assert set(parse("area:24", input_hw=(32, 32)).rects) == {(1, 24), (2, 12), (3, 8), (4, 6),
                                                             (6, 4), (8, 3), (12, 2), (24, 1)}


def test_area_huge_is_fast():
    # with the input size only heights up to H are tried; without it divisors up to sqrt(area)
    with pytest.raises(ThreatError):
        parse("area:1000000000000", input_hw=(32, 32))
    assert set(parse("area:1000000000000").rects) >= {(10 ** 6, 10 ** 6), (1, 10 ** 12), (10 ** 12, 1)}
    assert parse("area:999999999989").rects == ((1, 999999999989), (999999999989, 1))  # a prime
    # beyond 10**12 without the input size: a clear error instead of an endless divisor search
    with pytest.raises(ThreatError, match="input size"):
        parse("area:" + "9" * 30)
    with pytest.raises(ThreatError, match="fits"):
        parse("area:" + "9" * 30, input_hw=(64, 64))
    big = 2 ** 20 * 3 ** 13  # > 10**12, but fine once the input size bounds the heights
    want = {(h, big // h) for h in range(1, 2 ** 20 + 1) if big % h == 0 and big // h <= 2 ** 21}
    assert want and set(parse(f"area:{big}", input_hw=(2 ** 20, 2 ** 21)).rects) == want


def test_rot45_5x5_is_8x8():
    assert parse("rot45:5x5").rects == ((8, 8),)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 5), (3, 7), (10, 10), (16, 4), (31, 1)])
def test_rot45_bounding_box(h, w):
    # the rotated h x w rectangle spans (h + w) / sqrt(2) on each axis; the box side is its ceiling
    side = math.ceil((h + w) / math.sqrt(2))
    assert parse(f"rot45:{h}x{w}").rects == ((side, side),)
    # exact check: smallest s with s * sqrt(2) >= h + w
    assert 2 * side * side >= (h + w) ** 2 > 2 * (side - 1) ** 2


def test_rot45_never_rounds_down_near_an_integer():
    # 768398401 / sqrt(2) = 543339720.00000000065...: a float ceil with a 1e-9 slack gives 543339720
    h, w = 768398400, 1
    (side, _), = parse(f"rot45:{h}x{w}").rects
    assert 2 * side * side >= (h + w) ** 2 > 2 * (side - 1) ** 2
    assert side == 543339721


def test_comma_lists_and_dedup():
    t = parse("5x5,area:24")
    assert t.rects[0] == (5, 5)
    assert set(t.rects) == {(5, 5)} | set(all_factor_pairs(24))
    assert len(t.rects) == 9
    # duplicates collapse, first occurrence order kept
    t = parse("5x5,5x5,rot45:3x3,5x5")
    assert t.rects == ((5, 5),)  # rot45:3x3 is 5x5 (6 / sqrt 2 = 4.24 -> 5)
    t = parse("4x6,area:24,6x4")
    assert len(t.rects) == len(set(t.rects)) == 8
    assert t.rects[0] == (4, 6)
    t = parse("2.4%,5x5,3x3", input_hw=(32, 32))
    assert t.rects == ((5, 5), (3, 3))
    assert t.keys == ("5x5", "3x3")


def test_rect_key():
    assert rect_key((3, 7)) == "3x7"


# ---------------------------------------------------------------- round trips

ROUND_TRIP_SPECS = ["5x5", "3x7", "2.4%", "area:24", "rot45:5x5", "5x5,area:24", "1%,2%,rot45:2x3",
                    "5x5,5x5", "area:12,3x4", "100%", "1x1", "  7X2 ,area:6 "]


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS)
def test_str_round_trips(spec):
    t = parse(spec, input_hw=(32, 32))
    again = parse(str(t), input_hw=(32, 32))
    assert again == t
    assert str(again) == str(t)
    if "%" not in spec:
        u = parse(spec)
        assert parse(str(u)) == u
        assert u.bind((32, 32)) == t


def test_bind_resolves_percentages():
    t = parse("2.4%", input_hw=(32, 32))
    assert t.bind((64, 64)).rects == ((10, 10),)  # 0.024 * 4096 = 98.3 -> 10x10
    with pytest.raises(ThreatError):
        parse("area:24").bind((2, 2))


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("spec,hw", [
    ("5x0", None), ("0x5", None), ("0x0", None), ("x5", None), ("5x", None), ("5", None), ("5x5x5", None),
    ("-5x5", None), ("5.5x5", None), ("5 x 5", None), ("5*5", None),
    ("120%", (32, 32)), ("0%", (32, 32)), ("0.0%", (32, 32)), ("100.0001%", (32, 32)), ("-1%", (32, 32)),
    ("%", (32, 32)), (".5%", (32, 32)), ("1e1%", (32, 32)),
    ("area:0", None), ("area:", None), ("area:-4", None), ("area:x", None), ("area:2.5", None),
    ("rot45:5x0", None), ("rot45:0x5", None), ("rot45:5", None), ("rot45:", None), ("rot30:5x5", None),
    ("garbage", None), ("hello world", None), ("5x5;3x3", None), ("5x5,", None), (",5x5", None), ("5x5,,3x3", None),
    ("", None), ("   ", None), (",", None),
    ("33x5", (32, 32)), ("5x33", (32, 32)), ("40x40", (32, 32)), ("rot45:30x30", (32, 32)),
    ("area:1089", (32, 32)), ("5x5,33x1", (32, 32)), ("100%", (32, 64)),
    ("2.4%", None), ("5x5,1%", None),
])
def test_bad_specs_raise_threat_error(spec, hw):
    with pytest.raises(ThreatError) as info:
        parse(spec, input_hw=hw)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert msg and "\n" not in msg and len(msg) < 300  # one clear line


@pytest.mark.parametrize("spec,hw", [
    ("1" * 5000 + "x1", None),  # more digits than int() converts
    ("area:" + "7" * 5000, None),
    ("1" * 5000 + "%", (32, 32)),
    ("rot45:" + "9" * 400 + "x1", (32, 32)),  # beyond float range: exact arithmetic, then too large
    ("9" * 400 + "x1", (32, 32)),
], ids=["rect-5000-digits", "area-5000-digits", "percent-5000-digits", "rot45-400-digits", "rect-400-digits"])
def test_huge_numbers_raise_threat_error(spec, hw):
    with pytest.raises(ThreatError):
        parse(spec, input_hw=hw)


def test_huge_numbers_without_input_are_exact():
    big = 10 ** 400
    assert parse(f"{big}x1").rects == ((big, 1),)
    (side, _), = parse(f"rot45:{big}x{big}").rects
    assert 2 * side * side >= (2 * big) ** 2 > 2 * (side - 1) ** 2


def test_error_messages_say_what_is_wrong():
    with pytest.raises(ThreatError, match="at least 1"):
        parse("5x0")
    with pytest.raises(ThreatError, match="larger than"):
        parse("33x5", input_hw=(32, 32))
    with pytest.raises(ThreatError, match="input size"):
        parse("2.4%")
    with pytest.raises(ThreatError, match="100%"):
        parse("120%", input_hw=(32, 32))
    with pytest.raises(ThreatError, match="not a spec"):
        parse("garbage")
    with pytest.raises(ThreatError, match="empty"):
        parse("")


def test_non_string_spec():
    with pytest.raises(ThreatError):
        parse(None)  # type: ignore[arg-type]
    with pytest.raises(ThreatError):
        parse(55)  # type: ignore[arg-type]


def test_threat_error_is_value_error():
    assert issubclass(ThreatError, ValueError)


# ---------------------------------------------------------------- fuzz

_TOKENS = st.one_of(
    st.sampled_from(["x", "X", "%", ".", ",", ":", "area", "area:", "rot45:", "rot", " ", "-", "0", "e", "\n", "٥"]),
    st.integers(min_value=0, max_value=10 ** 7).map(str),
    st.text(max_size=4),
)
_SPECISH = st.lists(_TOKENS, max_size=8).map("".join)


def _check_parse_or_threat_error(spec: str, hw) -> None:
    try:
        t = parse(spec, input_hw=hw)
    except ThreatError as e:
        assert str(e)
        return
    # it parsed: the result is well formed, fits, and round-trips
    assert t.rects and all(isinstance(h, int) and isinstance(w, int) and h >= 1 and w >= 1 for h, w in t.rects)
    assert len(set(t.rects)) == len(t.rects)
    if hw is not None:
        assert all(h <= hw[0] and w <= hw[1] for h, w in t.rects)
    assert parse(str(t), input_hw=hw) == t


@settings(max_examples=300, deadline=None)
@given(spec=st.one_of(st.text(max_size=30), _SPECISH),
       hw=st.one_of(st.none(), st.tuples(st.integers(1, 64), st.integers(1, 64))))
def test_fuzz_parses_or_raises_threat_error(spec, hw):
    _check_parse_or_threat_error(spec, hw)
