"""Annotated frames for ``certinfer run --annotate DIR``: each frame with its verdicts drawn on it.

A whole-frame verdict is a status-coloured border and a banner with the label and status; a detector box's
verdict is the box outlined in its status colour with a tag above it. Colours: green certified, amber
uncertified, orange alert, red fail-safe.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from certinfer.runtime.stream import FrameSource
from certinfer.runtime.verdict import Verdict

COLORS = {"certified": (0, 150, 0), "uncertified": (200, 140, 0), "alert": (220, 90, 0), "fail-safe": (200, 0, 0)}
MIN_SIDE = 256  # small model-sized frames (32x32) are enlarged so the text stays readable


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_text(verdict: Verdict) -> str:
    if verdict.status == "fail-safe":
        return "fail-safe: " + verdict.reason.split(":", 1)[0]
    return f"{verdict.class_name or verdict.label} | {verdict.status}"


def _banner(img: Image.Image, verdict: Verdict) -> None:
    color = COLORS.get(verdict.status, (128, 128, 128))
    pen = ImageDraw.Draw(img)
    font = _font(max(12, img.height // 16))
    pad = max(2, img.height // 80)
    text = label_text(verdict)
    bottom = pen.textbbox((pad, pad), text, font=font)[3] + pad
    pen.rectangle((0, 0, img.width - 1, img.height - 1), outline=color, width=pad)
    pen.rectangle((0, 0, img.width, bottom), fill=color)
    pen.text((pad, pad), text, fill=(255, 255, 255), font=font)


def _box(img: Image.Image, verdict: Verdict, scale: int) -> None:
    color = COLORS.get(verdict.status, (128, 128, 128))
    pen = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (v * scale for v in verdict.roi)
    width = max(2, img.height // 200)
    pen.rectangle((x0, y0, x1 - 1, y1 - 1), outline=color, width=width)
    font = _font(max(12, img.height // 40))
    text = label_text(verdict)
    left, top, right, bottom = pen.textbbox((x0, y0), text, font=font)
    lift = bottom - top + 2 * width
    y = y0 - lift if y0 - lift >= 0 else y1  # above the box, or below it at the frame's top
    pen.rectangle((x0, y, x0 + right - left + 2 * width, y + lift), fill=color)
    pen.text((x0 + width, y + width - top + y0), text, fill=(255, 255, 255), font=font)


def draw(frame: np.ndarray, verdicts: list[Verdict]) -> Image.Image:
    """The frame (H, W, 3 uint8) with its verdicts: boxes where they have one, else a banner."""
    img = Image.fromarray(frame)
    scale = math.ceil(MIN_SIDE / min(img.size))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    for v in verdicts:
        if v.roi is not None:
            _box(img, v, max(scale, 1))
        else:
            _banner(img, v)
    return img


def file_name(frame_id: str) -> str:
    """A safe, distinct .png name for a frame id (``clip.avi#3`` -> ``clip.avi_3.png``)."""
    name = re.sub(r"[^\w.-]+", "_", frame_id).lstrip(".") or "frame"
    return name if name.lower().endswith(".png") else name + ".png"


class Annotator:
    """Remembers each frame of a source until its verdicts are out, then writes it annotated to ``out_dir``;
    a frame that gets no verdict (no boxes) is written as it is."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()
        self._order: dict[str, int] = {}  # each frame id's place in the source, drawable or not

    def watch(self, source: FrameSource) -> FrameSource:
        def items():
            for n, (frame_id, frame) in enumerate(source):
                self._order[frame_id] = n
                if isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 \
                        and frame.shape[2] == 3 and min(frame.shape[:2]) > 0:
                    self._frames[frame_id] = frame
                yield frame_id, frame
        return FrameSource(items(), source.name)

    def write(self, verdicts: list[Verdict]) -> Path | None:
        """Write the frame of ``verdicts`` (all of one frame), after the earlier frames that got none; None when
        there is no frame to draw (e.g. an unreadable file)."""
        frame_id = verdicts[0].frame
        self._flush(before=self._order.pop(frame_id, -1))
        frame = self._frames.pop(frame_id, None)
        if frame is None:
            return None
        path = self.out_dir / file_name(frame_id)
        draw(frame, verdicts).save(path)
        return path

    def close(self) -> None:
        """Write the frames that got no verdict."""
        self._flush(before=None)

    def _flush(self, before: int | None) -> None:
        for frame_id in list(self._frames):
            if before is None or self._order.get(frame_id, before) < before:
                Image.fromarray(self._frames.pop(frame_id)).save(self.out_dir / file_name(frame_id))
                self._order.pop(frame_id, None)
