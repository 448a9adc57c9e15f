"""Shared fixtures: a tiny real ONNX classifier in a real bundle, certified by a registered test defense."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from certinfer.export.bundle_writer import write_bundle
from certinfer.runtime.certifier import Certifier, Decision, Options
from certinfer.runtime.defenses import register
from certinfer.runtime.verdict import Certificate, RectCert

TEST_KIND = "test-argmax"
CLASSES = ["stop", "yield", "speed-30", "speed-50"]
INPUT_HW = (16, 16)


class ArgmaxCertifier(Certifier):
    """A stand-in defense: the argmax of the logits, never certified."""

    name = TEST_KIND

    def output_shapes(self, role: str = "model") -> tuple[tuple[int, ...], ...]:
        return ((len(self.classes),),)

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.run_engine(x)

    def decide(self, features: np.ndarray, options: Options) -> list[Decision]:
        per_rect = {key: RectCert(certified=False, margin=-1.0) for key in self.threat.keys}
        cert = Certificate.from_rects(str(self.threat), per_rect)
        return [Decision(label=int(np.argmax(o)), certificate=cert, scores=o.tolist()) for o in features]


register(TEST_KIND, ArgmaxCertifier)


def _export_tiny_classifier(path: Path) -> Path:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, len(CLASSES), 1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, but 10x faster for a test model
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(2, 3, *INPUT_HW),), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    return path


def tiny_manifest() -> dict:
    return {
        "defense": {"kind": TEST_KIND, "params": {}},
        "input": {"hw": list(INPUT_HW), "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "classes": CLASSES, "resize": "bilinear"},
        "threat": "3x3",
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "batch": [1, 16]}],
        "provenance": {"dataset": "none", "commit": "test"},
    }


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export_tiny_classifier(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture
def tiny_bundle(tmp_path: Path, onnx_model: Path) -> Path:
    """A fresh bundle per test (tests may tamper with it)."""
    return write_bundle(tmp_path / "bundle", tiny_manifest(), {"model.onnx": onnx_model})


@pytest.fixture
def certifier(tiny_bundle: Path) -> Certifier:
    import certinfer

    return certinfer.load(tiny_bundle, backend="onnxruntime-cpu")


def _png_with_size(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (a decompression bomb when large); its pixel data is a 1x1 image's."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = b"IHDR" + struct.pack(">II", w, h) + bytes(data[24:29])
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


@pytest.fixture
def png_with_size():
    """Build PNG files whose header claims a given size (for decoder bomb tests)."""
    return _png_with_size


GTSRB4 = (1, 12, 13, 38)  # speed limit 30, priority road, yield, keep right: four distinct shapes/colours


def gtsrb_root() -> Path:
    """The data root holding GTSRB; skips the test where it is missing, except in CI (CI=true), where it fails:
    a training test that cannot find its data must not pass silently there."""
    from certinfer.train import data as datasets

    try:
        root = datasets.data_root(None)
    except FileNotFoundError:
        root = None
    if root is None or not (root / "gtsrb" / "gtsrb32.npz").is_file():
        message = "GTSRB data not found (../shared/data or $CERTINFER_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " in CI", pytrace=False)
        pytest.skip(message)
    return root


@pytest.fixture(name="gtsrb_root", scope="session")
def gtsrb_root_fixture() -> Path:
    return gtsrb_root()


@pytest.fixture(scope="session")
def gtsrb4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-class GTSRB image folder (300 train / 40 test images per class) for tiny end-to-end trainings."""
    from PIL import Image

    from certinfer.train import data as datasets

    root = gtsrb_root()
    out = tmp_path_factory.mktemp("gtsrb4")
    for part, per_class in (("train", 300), ("test", 40)):
        split = datasets.load(f"gtsrb:{part}", root)
        for c in GTSRB4:
            folder = out / part / f"{c:02d}"
            folder.mkdir(parents=True)
            for i, k in enumerate(np.flatnonzero(split.y == c)[:per_class]):
                Image.fromarray(split.x[k]).save(folder / f"{i:04d}.png")
    return out
