"""Camera frames: validation and the resize to the model input, used by the certifier and the stream alike."""

from __future__ import annotations

import numpy as np
from PIL import Image


class FrameError(ValueError):
    """A frame the certifier cannot use (wrong rank, dtype, channels, size, or non-finite values)."""


MAX_SIDE = 16384  # larger frames are refused rather than resized (memory, and no camera sends them)
MAX_PIXELS = 1 << 26  # 67M pixels (8192 x 8192; an 8K UHD frame has 33M): a frame or image file above it is refused


def _hint_channels(c: int) -> str:
    return {1: " (grayscale? repeat it to 3 channels)", 2: " (grayscale with alpha?)",
            4: " (RGBA? composite or drop the alpha channel)"}.get(c, "")


def _hint_dtype(dtype: np.dtype) -> str:
    if np.issubdtype(dtype, np.floating):
        return " (floats? scale to 0..255 and convert to uint8)"
    if np.issubdtype(dtype, np.integer) and dtype.itemsize > 1:
        return f" ({8 * dtype.itemsize}-bit? scale to 8 bits)"
    return ""


def validate_frames(frames: np.ndarray) -> np.ndarray:
    """Check a frame batch: (N, H, W, 3) uint8 RGB; a single (H, W, 3) frame is promoted to a batch.

    Cheap checks come first (type, rank, size, channels), so a huge or misshapen array is refused before any
    pass over its values; then non-finite values (a clearer message than the dtype's), then the dtype.
    """
    if not isinstance(frames, np.ndarray):
        raise FrameError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4:
        hint = " (a grayscale frame? repeat it to 3 channels)" if frames.ndim == 2 else ""
        raise FrameError(f"frames must be (N, H, W, 3) or (H, W, 3), got shape {frames.shape}{hint}")
    n, h, w, c = frames.shape
    if min(h, w) < 1 or n < 1:
        raise FrameError(f"empty frame batch or frame, shape {frames.shape}")
    if max(h, w) > MAX_SIDE:
        raise FrameError(f"frame {h}x{w} is larger than {MAX_SIDE} pixels on a side")
    if h * w > MAX_PIXELS:
        raise FrameError(f"frame {h}x{w} has more than {MAX_PIXELS} pixels")
    if c != 3:
        raise FrameError(f"frames must have 3 (RGB) channels, got {c}{_hint_channels(c)}")
    if np.issubdtype(frames.dtype, np.floating) and not np.isfinite(frames).all():
        raise FrameError("frames contain NaN or inf values")
    if frames.dtype != np.uint8:
        raise FrameError(f"frames must be uint8 RGB, got dtype {frames.dtype}{_hint_dtype(frames.dtype)}")
    return frames


def resize(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize uint8 frames to the model input with bilinear filtering (no-op at the right size)."""
    if frames.shape[1:3] == tuple(hw):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((hw[1], hw[0]), Image.BILINEAR)) for f in frames])
