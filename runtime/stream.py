"""Frame sources and the streaming loop: every frame in gets exactly one Verdict out.

A source yields ``(frame_id, frame)`` where ``frame`` is an RGB uint8 array or the Exception that stopped
it from being one (unreadable file, a video that broke). :func:`run_stream` certifies each frame and turns
every failure (unreadable or invalid frame, engine error or bad output, missed deadline) into a
``fail-safe`` Verdict, so the stream goes on and the caller can always fall back.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from certinfer.runtime.certifier import Certifier, EngineRunError
from certinfer.runtime.detections import Detection
from certinfer.runtime.frames import MAX_PIXELS, MAX_SIDE, FrameError, resize, validate_frames
from certinfer.runtime.verdict import Verdict

FrameItem = tuple[str, "np.ndarray | Exception"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pnm", ".tif", ".tiff", ".webp",
                            ".gif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
STATUS_ORDER = ("certified", "uncertified", "alert", "fail-safe")


class SourceError(ValueError):
    """A frame source that cannot be opened, or that broke while streaming."""


class UnreadableFrame(FrameError):
    """A frame file that cannot be decoded."""


@dataclass
class FrameSource:
    """An iterable of ``(frame_id, frame | Exception)`` with a name for messages."""

    items: Iterable[FrameItem]
    name: str = "frames"

    def __iter__(self) -> Iterator[FrameItem]:
        return iter(self.items)


# --- images -------------------------------------------------------------------------------------------

def _gray16_to_rgb(img: Image.Image) -> np.ndarray:
    # Pillow's own convert("L") clips 16-bit values at 255; scale the full 0..65535 range instead.
    a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    g = np.round(a / 257.0).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow image -> (H, W, 3) uint8 RGB: 16-bit gray scaled to 8 bits, alpha composited over black."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return _gray16_to_rgb(img)
    if img.mode == "F":
        raise UnreadableFrame("32-bit float images are not supported")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one image file to RGB uint8; refuses oversized images before decoding their pixels.

    Raises only :class:`UnreadableFrame` (whatever Pillow raises on a corrupt, truncated or unsupported file).
    """
    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
            if max(w, h) > MAX_SIDE:
                raise UnreadableFrame(f"image {w}x{h} is larger than {MAX_SIDE} pixels on a side")
            if w * h > MAX_PIXELS:  # below Pillow's own bomb limit, which only warns
                raise UnreadableFrame(f"image {w}x{h} has more than {MAX_PIXELS} pixels")
            img.load()  # raises on truncated or corrupt data
            return to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... on bad files
        raise UnreadableFrame(f"{Path(path).name}: {e}") from e


def _image_items(paths: list[Path]) -> Iterator[FrameItem]:
    for p in paths:
        try:
            yield p.name, decode_image(p)
        except UnreadableFrame as e:
            yield p.name, e


def image_file(path: str | os.PathLike) -> FrameSource:
    return FrameSource(_image_items([Path(path)]), str(path))


def folder(path: str | os.PathLike) -> FrameSource:
    """Image files of a folder (by suffix, hidden files skipped), in name order."""
    paths = sorted(p for p in Path(path).iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not p.is_dir())
    if not paths:
        raise SourceError(f"no image files in folder {path}")
    return FrameSource(_image_items(paths), str(path))


# --- video and cameras (OpenCV) -----------------------------------------------------------------------

def _cv2():
    """OpenCV, with FFmpeg's own log off (unless OPENCV_FFMPEG_LOGLEVEL is set): a file it cannot open is
    reported once, as a SourceError, not also as FFmpeg's warnings on stderr."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # quiet; read when OpenCV first uses FFmpeg
    try:
        import cv2
    except ImportError as e:
        raise SourceError('video files and cameras need OpenCV: pip install ".[video]"') from e
    return cv2


@contextmanager
def _quiet(cv2) -> Iterator[None]:
    """OpenCV's own warnings (e.g. "can't open camera by index") off while a capture opens."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def _capture_items(cap, name: str, expected: int | None, live: bool) -> Iterator[FrameItem]:
    """Frames of an opened capture; an early end (camera gone, truncated video) becomes a last failed item."""
    i = 0
    try:
        while True:
            try:
                ok, frame = cap.read()
            except Exception as e:  # cv2.error
                yield f"{name}#{i}", SourceError(f"{name}: {e}")
                return
            if not ok:
                if live:
                    yield f"{name}#{i}", SourceError(f"{name} stopped delivering frames after {i} frames")
                elif expected is not None and i < expected:
                    yield f"{name}#{i}", SourceError(f"{name} ended after {i} of {expected} frames")
                return
            yield f"{name}#{i}", np.ascontiguousarray(frame[..., ::-1] if frame.ndim == 3 else frame)  # BGR -> RGB
            i += 1
    finally:
        cap.release()


def video(path: str | os.PathLike | int) -> FrameSource:
    """A video file, a stream URL, or a camera index, read through OpenCV."""
    cv2 = _cv2()
    live = isinstance(path, int) or "://" in str(path)
    name = f"camera{path}" if isinstance(path, int) else Path(str(path)).name
    with _quiet(cv2):
        cap = cv2.VideoCapture(path if isinstance(path, int) else str(path))
    if not cap.isOpened():
        raise SourceError(f"cannot open {'camera ' + str(path) if isinstance(path, int) else path} with OpenCV")
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    return FrameSource(_capture_items(cap, name, count if count > 0 else None, live), name)


# --- raw arrays and dispatch --------------------------------------------------------------------------

def arrays(frames: np.ndarray | Iterable[np.ndarray]) -> FrameSource:
    """Frames from the Python API: one (H, W, 3) array, an (N, H, W, 3) batch, or an iterable of frames."""
    if isinstance(frames, np.ndarray):
        frames = list(frames) if frames.ndim == 4 else [frames]
    return FrameSource(((str(i), f) for i, f in enumerate(frames)), "arrays")


def open_source(source) -> FrameSource:
    """A FrameSource from a path (image, folder, video), a camera index, a URL, or arrays."""
    if isinstance(source, FrameSource):
        return source
    if isinstance(source, int) or (isinstance(source, str) and source.isdigit()):
        return video(int(source))
    if isinstance(source, str) and "://" in source:
        return video(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return folder(path)
        if not path.is_file():
            raise SourceError(f"no such file or folder: {path}")
        return video(path) if path.suffix.lower() in VIDEO_SUFFIXES else image_file(path)
    return arrays(source)


# --- the stream ---------------------------------------------------------------------------------------

@dataclass
class StreamSummary:
    """Counts of one stream: frames in, verdicts out by status, fail-safe reasons by kind.

    ``truth``, where the true labels are known (frame name -> label, e.g. the packaged sample frames'): each
    whole-frame verdict of a named frame gets its ``truth`` and ``correct``, and the summary counts how many
    verdicts are correct, and certified and correct.
    """

    frames_in: int = 0
    statuses: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    truth: Mapping[str, int] | None = None
    judged: int = 0
    correct: int = 0
    certified_correct: int = 0

    @property
    def verdicts_out(self) -> int:
        return sum(self.statuses.values())

    def add(self, verdict: Verdict) -> Verdict:
        self.statuses[verdict.status] += 1
        if verdict.status == "fail-safe":
            self.reasons[verdict.reason.split(":", 1)[0]] += 1
        if self.truth is not None and verdict.roi is None and verdict.frame in self.truth:
            self._judge(verdict, int(self.truth[verdict.frame]))
        return verdict

    def _judge(self, verdict: Verdict, truth: int) -> None:
        verdict.truth, verdict.correct = truth, verdict.label == truth
        self.judged += 1
        self.correct += verdict.correct
        self.certified_correct += verdict.correct and verdict.status == "certified"

    def __str__(self) -> str:
        line = f"{self.frames_in} frames in, {self.verdicts_out} verdicts out"
        if self.statuses:
            order = {s: i for i, s in enumerate(STATUS_ORDER)}
            counts = sorted(self.statuses.items(), key=lambda kv: order.get(kv[0], len(order)))
            line += ": " + ", ".join(f"{n} {s}" for s, n in counts)
        if self.reasons:
            line += " (" + ", ".join(f"{r}: {n}" for r, n in self.reasons.most_common()) + ")"
        if self.judged:
            line += f"; {self.correct} of {self.judged} correct, {self.certified_correct} certified and correct"
        return line


@dataclass
class _Pending:
    frame_id: str
    arrived: float
    position: int = 0  # 0-based place in the stream
    frame: np.ndarray | None = None
    reason: str = ""


def _reason(e: BaseException) -> str:
    """A fail-safe reason: its kind (grouped in the summary) before the first colon."""
    if isinstance(e, SourceError):
        return f"source broke: {e}"
    if isinstance(e, UnreadableFrame):
        return f"unreadable frame: {e}"
    if isinstance(e, FrameError):
        return f"invalid frame: {e}"
    if isinstance(e, EngineRunError):
        return f"engine error: {e}"
    return f"certifier error: {type(e).__name__}: {e}"


def _accept(frame_id: str, item, arrived: float, position: int) -> _Pending:
    if isinstance(item, Exception):
        return _Pending(frame_id, arrived, position, reason=_reason(item))
    try:
        frame = validate_frames(item)
        if len(frame) != 1:
            raise FrameError(f"a stream frame must be (H, W, 3), got shape {item.shape}")
        return _Pending(frame_id, arrived, position, frame=frame[0])
    except FrameError as e:
        return _Pending(frame_id, arrived, position, reason=_reason(e))


def _late(p: _Pending, now: float, deadline_ms: float | None) -> bool:
    return deadline_ms is not None and (now - p.arrived) * 1e3 > deadline_ms


def _certify(certifier: Certifier, frames: list[np.ndarray]) -> list[list[Verdict]] | str:
    """One verdict per frame, for frames in one batch, or the fail-safe reason for all of them."""
    try:  # each frame (validated on arrival) is resized to the model input once; the batch holds small copies
        verdicts = certifier(np.stack([resize(f[None], certifier.input_hw)[0] for f in frames]))
    except Exception as e:
        return _reason(e)
    if len(verdicts) != len(frames):
        return f"certifier error: {len(verdicts)} verdicts for {len(frames)} frames"
    return [[v] for v in verdicts]


def _certify_regions(certifier: Certifier, frames: list[np.ndarray],
                     boxes: list[list[Detection] | None]) -> list[list[Verdict] | str]:
    """The verdicts of each frame's boxes (each whole frame without boxes), frames of one size in one call."""
    answers: list[list[Verdict] | str] = [[] for _ in frames]
    by_shape: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        by_shape.setdefault(f.shape, []).append(i)
    for members in by_shape.values():
        rois = None if boxes[members[0]] is None else [[d.box for d in boxes[i]] for i in members]
        try:
            verdicts = certifier(np.stack([frames[i] for i in members]), rois=rois)
        except Exception as e:
            for i in members:
                answers[i] = _reason(e)
            continue
        for v in verdicts:
            answers[members[int(v.frame)]].append(v)
    for i, dets in enumerate(boxes):
        if dets is not None and isinstance(answers[i], list):
            for v, d in zip(answers[i], dets):
                v.roi_id = d.id
    return answers


def _answers(certifier: Certifier, pending: list[_Pending], live: list[int],
             rois: Mapping[str | int, list[Detection]] | None) -> dict[int, list[Verdict] | str]:
    frames = [pending[i].frame for i in live]
    if rois is None and not certifier.threat.camera:
        result = _certify(certifier, frames) if live else []
        return {i: result if isinstance(result, str) else result[k] for k, i in enumerate(live)}
    boxes = [None if rois is None else rois.get(pending[i].frame_id, rois.get(pending[i].position, []))
             for i in live]
    return dict(zip(live, _certify_regions(certifier, frames, boxes)))


def _flush(certifier: Certifier, pending: list[_Pending], deadline_ms: float | None,
           rois: Mapping[str | int, list[Detection]] | None) -> Iterator[Verdict]:
    start = time.perf_counter()
    live = [i for i, p in enumerate(pending) if p.frame is not None and not _late(p, start, deadline_ms)]
    answers = _answers(certifier, pending, live, rois)
    done = time.perf_counter()
    for i, p in enumerate(pending):
        elapsed = (done - p.arrived) * 1e3
        answer = answers.get(i, p.reason)
        if not p.reason and (answer == "" or isinstance(answer, list) and _late(p, done, deadline_ms)):
            answer = f"deadline missed: {elapsed:.1f} ms > {deadline_ms:g} ms"
        if isinstance(answer, str):
            answer = [Verdict.fail_safe(answer, backend=certifier.engine.name, timings_ms={"total": elapsed})]
        for v in answer:
            v.frame = p.frame_id
            yield v


def _guarded(source: FrameSource) -> Iterator[FrameItem]:
    """The source's items; if iterating it raises (a user's generator, a broken reader), one last failed item."""
    it, n = iter(source), 0
    while True:
        try:
            frame_id, item = next(it)
        except StopIteration:
            return
        except Exception as e:
            yield f"{source.name}#{n}", SourceError(f"{source.name} raised {type(e).__name__}: {e}")
            return
        n += 1
        yield frame_id, item


def run_stream(certifier: Certifier, source, deadline_ms: float | None = None, batch: int = 1,
               summary: StreamSummary | None = None,
               rois: Mapping[str | int, list[Detection]] | None = None) -> Iterator[Verdict]:
    """Certify every frame of ``source`` (anything :func:`open_source` takes), ``batch`` frames per engine call.

    Yields one Verdict per frame in order; with ``rois`` (a detector's boxes by frame name or 0-based position,
    see :mod:`certinfer.runtime.detections`), one per box instead, and none for a frame without boxes. A frame whose verdict is not ready ``deadline_ms`` after it was
    read gets a fail-safe verdict instead. A source that raises while iterated ends the stream with one more
    fail-safe verdict (``source broke``), after the frames read before it are answered. ``summary``, when
    given, is updated as the stream goes.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    if deadline_ms is not None and deadline_ms < 0:
        raise ValueError(f"deadline must be >= 0 ms, got {deadline_ms}")
    summary = summary if summary is not None else StreamSummary()
    pending: list[_Pending] = []
    for position, (frame_id, item) in enumerate(_guarded(open_source(source))):
        summary.frames_in += 1
        pending.append(_accept(frame_id, item, time.perf_counter(), position))
        if len(pending) == batch:
            yield from map(summary.add, _flush(certifier, pending, deadline_ms, rois))
            pending = []
    if pending:
        yield from map(summary.add, _flush(certifier, pending, deadline_ms, rois))
