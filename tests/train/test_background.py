"""The "no sign" class: where its images come from, what is held out, and how a split gains the class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from certinfer.train import background as no_sign
from certinfer.train.data import Split
from certinfer.train.trainer import with_background


@pytest.fixture(scope="module")
def root(gtsrb_root: Path) -> Path:
    if not (gtsrb_root / "frames").is_dir() or not (gtsrb_root / "cifar10").is_dir():
        pytest.skip("dashcam frames or CIFAR-10 not in the data folder")
    return gtsrb_root


def test_held_out_frames_exist_and_are_not_trained_on(root: Path):
    names = {p.name for p in (root / "frames").glob("*.jpg")}
    assert set(no_sign.HELD_OUT) <= names and no_sign.SIGN_FREE <= names
    train = {n for n, _ in no_sign._frames(root, held_out=False)}
    test = {n for n, _ in no_sign._frames(root, held_out=True)}
    assert train.isdisjoint(test) and test == set(no_sign.HELD_OUT) and len(train) == len(names) - 3


def test_crops_avoid_the_horizon_band_of_frames_with_signs(root: Path, monkeypatch: pytest.MonkeyPatch):
    """Each crop lies in an allowed band: record where crops are cut by giving every row its own colour."""
    h, w = 540, 960
    rows = np.repeat(np.repeat(np.arange(h, dtype=np.uint16)[:, None], w, 1)[..., None], 3, 2)
    frame = (rows % 256).astype(np.uint8)
    frame[..., 1] = (rows[..., 0] // 256).astype(np.uint8)
    monkeypatch.setattr(no_sign, "_frames", lambda r, held_out: [("with_signs.jpg", frame)])
    cut_rows = []
    original = no_sign.Image.fromarray
    monkeypatch.setattr(no_sign.Image, "fromarray", lambda a: cut_rows.append(
        (int(a[0, 0, 0]) + 256 * int(a[0, 0, 1]), int(a[-1, 0, 0]) + 256 * int(a[-1, 0, 1]))) or original(a))
    no_sign.dashcam_crops(Path("."), 200, np.random.default_rng(0), held_out=False)
    top, bottom = no_sign.BAND[0] * h, no_sign.BAND[1] * h
    assert all(last < top or first >= int(bottom) for first, last in cut_rows)
    assert any(last < top for _, last in cut_rows) and any(first >= bottom for first, _ in cut_rows)


def test_background_images_are_seeded_and_split(root: Path):
    a = no_sign.background(root, "train", seed=3, n=40)
    assert a.shape == (40, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, no_sign.background(root, "train", seed=3, n=40))
    assert not np.array_equal(a, no_sign.background(root, "test", seed=3, n=40))
    with pytest.raises(ValueError, match="train or test"):
        no_sign.background(root, "val", seed=0)


def test_a_split_gains_the_class_last_with_its_own_groups():
    split = Split(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 1, 0]), ["a", "b"], "toy",
                  groups=np.array([5, 6, 6, 5]))
    out = with_background(split, np.ones((3, 8, 8, 3), np.uint8))
    assert out.classes == ["a", "b", no_sign.NAME]
    assert out.y.tolist() == [0, 1, 1, 0, 2, 2, 2]
    assert len(set(out.groups[4:].tolist())) == 3 and set(out.groups[4:]).isdisjoint(out.groups[:4])
