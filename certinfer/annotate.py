"""Annotated frames for ``certinfer run --annotate DIR``: each frame with its label and status drawn on it."""

from __future__ import annotations

import math
import re
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


def draw(frame: np.ndarray, verdict: Verdict) -> Image.Image:
    """The frame (H, W, 3 uint8) with a status-coloured border and a banner holding label and status."""
    img = Image.fromarray(frame)
    scale = math.ceil(MIN_SIDE / min(img.size))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    color = COLORS.get(verdict.status, (128, 128, 128))
    pen = ImageDraw.Draw(img)
    font = _font(max(12, img.height // 16))
    pad = max(2, img.height // 80)
    text = label_text(verdict)
    bottom = pen.textbbox((pad, pad), text, font=font)[3] + pad
    pen.rectangle((0, 0, img.width - 1, img.height - 1), outline=color, width=pad)
    pen.rectangle((0, 0, img.width, bottom), fill=color)
    pen.text((pad, pad), text, fill=(255, 255, 255), font=font)
    return img


def file_name(frame_id: str) -> str:
    """A safe, distinct .png name for a frame id (``clip.avi#3`` -> ``clip.avi_3.png``)."""
    name = re.sub(r"[^\w.-]+", "_", frame_id).lstrip(".") or "frame"
    return name if name.lower().endswith(".png") else name + ".png"


class Annotator:
    """Remembers each frame of a source until its verdict is out, then writes it annotated to ``out_dir``."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._frames: dict[str, np.ndarray] = {}

    def watch(self, source: FrameSource) -> FrameSource:
        def items():
            for frame_id, frame in source:
                if isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 \
                        and frame.shape[2] == 3 and min(frame.shape[:2]) > 0:
                    self._frames[frame_id] = frame
                yield frame_id, frame
        return FrameSource(items(), source.name)

    def write(self, verdict: Verdict) -> Path | None:
        """Write the verdict's frame; None when there is no frame to draw (e.g. an unreadable file)."""
        frame = self._frames.pop(verdict.frame, None)
        if frame is None:
            return None
        path = self.out_dir / file_name(verdict.frame)
        draw(frame, verdict).save(path)
        return path
