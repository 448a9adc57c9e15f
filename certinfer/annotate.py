"""Annotated frames for ``certinfer run --annotate DIR``: each frame with its verdicts drawn on it.

A whole-frame verdict is a status-coloured border and a banner with the label and status; a detector box's
verdict is the box outlined in its status colour with a tag above it. Colours: green certified, amber
uncertified, orange alert, red fail-safe. A long class name is shortened so that the status always shows.
Files are named after their frames (``sign.jpg`` -> ``sign.png``; a video's frame ``clip.mp4#12`` ->
``clip_000012.png``, so that name order is frame order).
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
    """``class | status``, with the threat a certified verdict holds against (``Stop | certified 5x5``)."""
    if verdict.status == "fail-safe":
        return "fail-safe: " + verdict.reason.split(":", 1)[0]
    status = verdict.status
    if status == "certified" and verdict.certificate is not None:
        status += f" {verdict.certificate.threat}"
    return f"{verdict.class_name or verdict.label} | {status}"


def fit_text(pen: ImageDraw.ImageDraw, verdict: Verdict, font: ImageFont.ImageFont, width: float) -> str:
    """The verdict's text within ``width`` pixels: the class name shortened ("...") so that the status shows."""
    text = label_text(verdict)
    name, sep, status = text.rpartition(" | ")
    while name and pen.textlength(text, font=font) > width:
        name = name[:-1].rstrip()
        text = f"{name}...{sep}{status}"
    return text


def _banner(img: Image.Image, verdict: Verdict) -> None:
    color = COLORS.get(verdict.status, (128, 128, 128))
    pen = ImageDraw.Draw(img)
    font = _font(max(12, img.height // 16))
    pad = max(2, img.height // 80)
    text = fit_text(pen, verdict, font, img.width - 2 * pad)
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
    text = fit_text(pen, verdict, font, img.width - 2 * width)
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    tag_w, lift = right - left + 2 * width, bottom - top + 2 * width
    x = max(0, min(x0, img.width - tag_w))  # the whole tag inside the frame, even for a box at its right edge
    y = y0 - lift if y0 - lift >= 0 else min(y1, img.height - lift)  # above the box, or below it at the top
    pen.rectangle((x, y, x + tag_w, y + lift), fill=color)
    pen.text((x + width - left, y + width - top), text, fill=(255, 255, 255), font=font)


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
    """A safe .png name for a frame id: ``sign.jpg`` -> ``sign.png``, a video's ``clip.mp4#12`` ->
    ``clip_000012.png`` (zero-padded, so that name order is frame order)."""
    source, sep, index = frame_id.rpartition("#")
    stem = f"{Path(source).stem}_{int(index):06d}" if sep and index.isdigit() else Path(frame_id).stem
    return (re.sub(r"[^\w.-]+", "_", stem).lstrip(".") or "frame") + ".png"


class Annotator:
    """Remembers each frame of a source until its verdicts are out, then writes it annotated to ``out_dir``;
    a frame that gets no verdict (no boxes) is written as it is."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()
        self._order: dict[str, int] = {}  # each frame id's place in the source, drawable or not
        self._names: set[str] = set()  # the file names written so far

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
        path = self._path(frame_id)
        draw(frame, verdicts).save(path)
        return path

    def close(self) -> None:
        """Write the frames that got no verdict."""
        self._flush(before=None)

    def _flush(self, before: int | None) -> None:
        for frame_id in list(self._frames):
            if before is None or self._order.get(frame_id, before) < before:
                Image.fromarray(self._frames.pop(frame_id)).save(self._path(frame_id))
                self._order.pop(frame_id, None)

    def _path(self, frame_id: str) -> Path:
        """A file for the frame that no other frame of this run has: ``sign.png`` for ``sign.jpg``, then
        ``sign_png.png`` for ``sign.png``, then ``sign_png-2.png`` ..."""
        name = file_name(frame_id)
        if name in self._names:
            name = file_name(frame_id.replace(".", "_"))
        stem, n = name[:-len(".png")], 2
        while name in self._names:
            name, n = f"{stem}-{n}.png", n + 1
        self._names.add(name)
        return self.out_dir / name
