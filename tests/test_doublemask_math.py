"""Double masking: the mask set's covering property, masking, certification and inference against the paper."""

from __future__ import annotations

import numpy as np
import pytest

from certinfer.threat import ThreatError, parse
from certinfer.runtime.defenses import doublemask as dm

THREATS = ("5x5", "2.4%", "area:24", "rot45:5x5", "3x7")
SIZES = ((32, 32), (16, 24), (7, 9), (9, 7))
STRIDES = (1, 2, 5, (3, 4), 40)


def _covered(masks: np.ndarray, hw, rect) -> bool:
    """Brute force: every location of ``rect`` lies entirely inside at least one mask."""
    h, w = rect
    return all(masks[:, r:r + h, c:c + w].all(axis=(1, 2)).any()
               for r in range(hw[0] - h + 1) for c in range(hw[1] - w + 1))


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("threat", THREATS)
@pytest.mark.parametrize("stride", STRIDES)
def test_mask_set_covers_every_location_of_every_rectangle(hw, threat, stride):
    try:
        rects = parse(threat, input_hw=hw).rects
    except ThreatError:
        pytest.skip(f"{threat} does not fit {hw}")
    masks = dm.mask_set(hw, threat, stride)
    assert masks.dtype == bool and masks.shape[1:] == hw
    assert len({m.tobytes() for m in masks}) == len(masks)  # deduplicated
    for rect in rects:
        assert _covered(masks, hw, rect), rect


def test_mask_sizes_stride_and_flush_border():
    boxes = dm.mask_boxes((32, 32), "5x5", 5)
    assert set(map(tuple, boxes[:, 2:])) == {(9, 9)}
    assert sorted(set(boxes[:, 0])) == [0, 5, 10, 15, 20, 23]  # the last mask flush with the border
    assert len(boxes) == 36  # PatchCleanser's 6 x 6 for a 5x5 patch on 32x32 at stride 5
    big = dm.mask_boxes((7, 9), "5x5", 40)  # masks larger than the input are clipped to it: one mask
    assert big.tolist() == [[0, 0, 7, 9]]
    assert dm.mask_boxes((16, 24), "3x7", (3, 4)).tolist()[:2] == [[0, 0, 5, 10], [0, 4, 5, 10]]


def test_mask_set_rejects_bad_strides():
    for bad in (0, -1, 1.5, (2, 0)):
        with pytest.raises(ValueError):
            dm.mask_set((32, 32), "5x5", bad)


def test_apply_masks_scalar_and_per_channel_value():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 7, 9)).astype(np.float32)
    masks = dm.mask_set((7, 9), "2x2", 3)
    for value in (0.0, [1.0, -2.0, 0.5]):
        out = dm.apply_masks(x, masks, value)
        assert out.shape == (2, len(masks), 3, 7, 9) and out.dtype == np.float32
        v = np.broadcast_to(np.asarray(value, np.float32).reshape(-1, 1, 1), (3, 7, 9))
        for n in range(2):
            for k, m in enumerate(masks):
                assert np.array_equal(out[n, k], np.where(m, v, x[n]))
