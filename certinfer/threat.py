"""The patch threat model: which patch rectangles an attacker may place, anywhere inside the input.

Specs (comma lists combine them):
  ``5x5``        one rectangle, h x w model-input pixels
  ``2.4%``       a square covering that share of the input area, side rounded up (needs the input size)
  ``area:24``    every rectangle with h * w == 24 that fits the input (BagCert Fig. 4)
  ``rot45:5x5``  the axis-aligned bounding box of the h x w patch rotated by 45 degrees: the rotated
                 patch owns the pixels whose centres fall inside it, and an interval of length
                 (h + w) / sqrt(2) holds at most ceil((h + w) / sqrt(2)) pixel centres per axis
  ``...@camera`` the rectangles are in camera-frame pixels (``24x24@camera``): the runtime maps them to model
                 pixels through each frame's or box's resize (see ``certinfer.runtime.camera``)

A certificate against a threat holds against every rectangle in it at every location.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

Rect = tuple[int, int]

_RECT = re.compile(r"^(\d+)x(\d+)$")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_AREA = re.compile(r"^area:(\d+)$")
_ROT45 = re.compile(r"^rot45:(\d+)x(\d+)$")


# Without the input size, area:N lists every factor pair by trial division up to sqrt(N); past this it would hang.
_MAX_AREA_WITHOUT_INPUT = 10 ** 12


CAMERA = "@camera"


class ThreatError(ValueError):
    """A threat spec that cannot be parsed or does not fit the input."""


def rect_key(rect: Rect) -> str:
    """The key a rectangle has in certificates: ``"5x5"``."""
    return f"{rect[0]}x{rect[1]}"


def _ceil_sqrt(q: Fraction | int) -> int:
    """The smallest integer ``s >= 0`` with ``s * s >= q``, in exact arithmetic (never rounds a side down)."""
    n = math.ceil(q)  # s * s is an integer, so s * s >= q exactly when s * s >= ceil(q)
    s = math.isqrt(max(n, 0))
    return s if s * s >= n else s + 1


def _rot45_box(h: int, w: int) -> Rect:
    # the rotated patch spans (h + w) / sqrt(2) per axis; side = ceil of that, i.e. the least s with 2 s^2 >= (h + w)^2
    side = _ceil_sqrt(Fraction((h + w) ** 2, 2))
    return side, side


def _number(text: str, item: str, kind=int):
    try:
        return kind(text)
    except (ValueError, OverflowError) as e:  # e.g. more digits than int() converts
        raise ThreatError(f"threat {item!r}: {text[:20]!r}... is not a usable number") from e


def _item_rects(item: str, input_hw: Rect | None) -> tuple[Rect, ...]:
    if m := _RECT.match(item):
        h, w = _number(m[1], item), _number(m[2], item)
        if h < 1 or w < 1:
            raise ThreatError(f"threat {item!r}: patch sides must be at least 1 pixel")
        return ((h, w),)
    if m := _ROT45.match(item):
        h, w = _number(m[1], item), _number(m[2], item)
        if h < 1 or w < 1:
            raise ThreatError(f"threat {item!r}: patch sides must be at least 1 pixel")
        return (_rot45_box(h, w),)
    if m := _PERCENT.match(item):
        share = _number(m[1], item, Fraction) / 100  # exact: the side must never be rounded down
        if not 0 < share <= 1:
            raise ThreatError(f"threat {item!r}: a share of the input must be in (0%, 100%]")
        if input_hw is None:
            raise ThreatError(f"threat {item!r}: a percentage needs the input size (parse(spec, input_hw=...))")
        side = _ceil_sqrt(share * input_hw[0] * input_hw[1])
        return ((side, side),)
    if m := _AREA.match(item):
        area = _number(m[1], item)
        if area < 1:
            raise ThreatError(f"threat {item!r}: the area must be at least 1 pixel")
        if input_hw is not None:  # only heights up to the input's can fit: O(H), not O(area)
            rects = [(h, area // h) for h in range(1, min(area, input_hw[0]) + 1)
                     if area % h == 0 and area // h <= input_hw[1]]
            if not rects:
                raise ThreatError(f"threat {item!r}: no rectangle of that area fits the {input_hw[0]}x{input_hw[1]} input")
        else:  # every factor pair, by divisors up to sqrt(area): O(sqrt(area)), not O(area)
            if area > _MAX_AREA_WITHOUT_INPUT:
                raise ThreatError(f"threat 'area:{str(area)[:20]}...': without the input size (parse(spec, input_hw=...)) "
                                  f"the area can be at most {_MAX_AREA_WITHOUT_INPUT} pixels")
            small = [h for h in range(1, math.isqrt(area) + 1) if area % h == 0]
            heights = small + [area // h for h in reversed(small) if h * h != area]
            rects = [(h, area // h) for h in heights]
        return tuple(rects)
    raise ThreatError(f"threat {item!r} is not a spec: use HxW, P%, area:N or rot45:HxW (comma lists combine them)")


@dataclass(frozen=True)
class Threat:
    """A parsed threat: its spec items and, once the input size is known, its rectangles."""

    items: tuple[str, ...]
    rects: tuple[Rect, ...]
    input_hw: Rect | None = None
    camera: bool = False  # rectangles in camera-frame pixels, mapped per frame or box at run time

    def __str__(self) -> str:
        return ",".join(self.items) + (CAMERA if self.camera else "")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(rect_key(r) for r in self.rects)

    def bind(self, input_hw: Rect) -> Threat:
        """The same spec resolved against an input size (percentages, fit checks); a camera threat is unchanged."""
        return self if self.camera else parse(str(self), input_hw=input_hw)


def parse(spec: str, input_hw: Rect | None = None) -> Threat:
    """Parse a threat spec such as ``"5x5,area:24"``; with ``input_hw`` every rectangle must fit the input.

    A spec ending in ``@camera`` is in camera-frame pixels: ``input_hw`` does not apply to it.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ThreatError("empty threat spec: use HxW, P%, area:N or rot45:HxW")
    body = spec.strip().lower()
    if body.endswith(CAMERA):
        return _parse_camera(body[:-len(CAMERA)])
    items = tuple(s.strip() for s in body.split(","))
    rects: list[Rect] = []
    for item in items:
        for rect in _item_rects(item, input_hw):
            if input_hw is not None and (rect[0] > input_hw[0] or rect[1] > input_hw[1]):
                raise ThreatError(
                    f"threat {item!r}: patch {rect_key(rect)} is larger than the {input_hw[0]}x{input_hw[1]} input")
            if rect not in rects:
                rects.append(rect)
    return Threat(items=items, rects=tuple(rects), input_hw=input_hw)


def _parse_camera(body: str) -> Threat:
    items = tuple(s.strip() for s in body.split(","))
    if any(_PERCENT.match(item) for item in items):
        raise ThreatError(f"threat {body + CAMERA!r}: a percentage has no meaning in camera pixels; give HxW@camera")
    plain = parse(body)  # the rectangles, with no input to fit
    return Threat(items=plain.items, rects=plain.rects, camera=True)
