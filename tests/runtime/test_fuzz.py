"""Bounded fuzzing (hypothesis) of what reads untrusted bytes: the bundle manifest and archives, the frame decoder,
and frame validation. Each target may only raise its documented error type. (The threat parser: test_threat.py.)
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import resource
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from certinfer.runtime.bundle import BundleError, load_bundle, manifest_digest, validate_manifest
from certinfer.runtime.frames import MAX_PIXELS, MAX_SIDE, FrameError, validate_frames
from certinfer.runtime.stream import UnreadableFrame, decode_image

# Pillow warns when it opens a header above its own limit; certinfer refuses those sizes right after.
# Most fuzzed manifests are unsealed: a seal would refuse every mutation that passes validation, so the loads
# that should succeed (and the checks after the seal) would go unexercised.
pytestmark = [pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore::certinfer.runtime.bundle.UnsealedBundleWarning")]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
MODEL = b"not parsed: load_bundle only hashes engine files"

# --- manifests ----------------------------------------------------------------------------------------

VALID = {
    "schema": 1,
    "defense": {"kind": "bagcert", "params": {"condition": "3.2"}},
    "input": {"hw": [16, 16], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
              "classes": ["stop", "yield"], "resize": "bilinear"},
    "geometry": {"rf": [3, 3], "stride": [1, 1], "padding": [1, 1], "input_hw": [16, 16], "output_hw": [16, 16]},
    "threat": "3x3,area:4",
    "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "batch": [1, 16], "role": "model",
                 "sha256": hashlib.sha256(MODEL).hexdigest()}],
    "probe": {"exact_backends": ["onnxruntime-cpu"]},
    "provenance": {"commit": "test"},
}

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
    | st.sampled_from([0, 1, -1, 2, 16, 17, 16384, 16385, "", "..", "/etc/passwd", "model.onnx", "manifest.json",
                      "onnx", "tensorrt", "torch", "fp32", "a" * 300, "5x5", "area:1000000", "100%", "rot45:9x9"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated_manifests(draw) -> object:
    """The valid manifest with 1-4 edits anywhere in it: a value replaced, a key or item deleted, a key added."""
    m = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(m)))
        if not path:
            m = draw(JSON) if draw(st.integers(0, 9)) == 0 else m
            continue
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if op == "replace":
            parent[path[-1]] = draw(JSON)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        else:
            parent.append(draw(JSON))
        if not isinstance(m, (dict, list)):
            break
    return m


def _bytes_mutations(text: bytes) -> st.SearchStrategy[bytes]:
    def apply(edits: list[tuple[int, int, bytes]]) -> bytes:
        data = bytearray(text)
        for pos, cut, insert in edits:
            pos %= len(data) + 1
            data[pos:pos + cut] = insert
        return bytes(data)

    return st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 8), st.binary(max_size=6)),
                    min_size=1, max_size=5).map(apply)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzzbundle")
    (root / "model.onnx").write_bytes(MODEL)
    return root


def _load_or_bundle_error(root: Path, data: bytes) -> None:
    (root / "manifest.json").write_bytes(data)
    try:
        bundle = load_bundle(root)
    except BundleError as e:
        assert str(e)
        return
    assert validate_manifest(copy.deepcopy(bundle.manifest)) == bundle.manifest  # what loads re-validates


def test_the_valid_manifest_loads(bundle_dir: Path):
    _load_or_bundle_error(bundle_dir, json.dumps(VALID).encode())
    assert load_bundle(bundle_dir).manifest["threat"] == "3x3,area:4"


@FUZZ
@given(m=mutated_manifests())
def test_fuzz_mutated_manifests_load_or_raise_bundle_error(bundle_dir: Path, m):
    try:
        validate_manifest(copy.deepcopy(m))
    except BundleError:
        pass
    _load_or_bundle_error(bundle_dir, json.dumps(m).encode())


@FUZZ
@given(m=mutated_manifests())
def test_fuzz_a_sealed_manifest_loads_only_unchanged(bundle_dir: Path, m):
    sealed = {**VALID, "manifest_sha256": manifest_digest(VALID)}
    if isinstance(m, dict):
        m = {**m, "manifest_sha256": sealed["manifest_sha256"]}
    try:
        load_bundle_with(bundle_dir, json.dumps(m).encode())
    except BundleError as e:
        assert str(e)
    else:
        assert manifest_digest(m) == sealed["manifest_sha256"], "an edited sealed manifest loaded"


def load_bundle_with(root: Path, data: bytes):
    (root / "manifest.json").write_bytes(data)
    return load_bundle(root)


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), _bytes_mutations(json.dumps(VALID).encode()),
                      st.integers(1, 5000).map(lambda d: b"[" * d + b"]" * d),  # nesting past the recursion limit
                      st.integers(1, 6000).map(lambda d: b'{"schema": ' + b"9" * d + b"}"),  # past int's digit limit
                      st.sampled_from([b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"NaN", b'"\\ud800"', b"{" * 10])))
def test_fuzz_manifest_bytes_load_or_raise_bundle_error(bundle_dir: Path, data: bytes):
    _load_or_bundle_error(bundle_dir, data)


def _tar_bytes(manifest: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("b/manifest.json", json.dumps(manifest).encode()), ("b/model.onnx", MODEL)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@FUZZ
@given(data=_bytes_mutations(_tar_bytes(VALID)) | st.integers(0, 400).map(lambda n: _tar_bytes(VALID)[:n]))
def test_fuzz_bundle_archives_load_or_raise_bundle_error(tmp_path_factory: pytest.TempPathFactory, data: bytes):
    path = tmp_path_factory.getbasetemp() / "fuzz.tar.gz"
    path.write_bytes(data)
    try:
        bundle = load_bundle(path)
    except BundleError as e:
        assert str(e)
    else:
        assert bundle.manifest["engines"][0]["file"] == "model.onnx"


def test_manifest_limits_keep_validation_bounded(bundle_dir: Path):
    """Sizes and threat specs a manifest could use to make loading hang are refused up front."""
    slow = copy.deepcopy(VALID)
    slow["input"]["hw"] = [10**10, 10**10]
    slow["threat"] = "area:10000000000"  # O(input height) rectangles to try
    long = copy.deepcopy(VALID)
    long["threat"] = ",".join(f"{i}x1" for i in range(1, 16)) * 100
    t0 = time.perf_counter()
    for m, match in ((slow, "at most 16384"), (long, "longer than")):
        with pytest.raises(BundleError, match=match):
            validate_manifest(m)
    assert time.perf_counter() - t0 < 1.0


# --- the frame decoder --------------------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


_RNG = np.random.default_rng(0)
_RGB = Image.fromarray(_RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8))
REAL = {
    ".png": _encode(_RGB, "PNG"), ".jpg": _encode(_RGB, "JPEG", quality=80),
    ".bmp": _encode(_RGB, "BMP"), ".gif": _encode(_RGB.convert("P"), "GIF"), ".tif": _encode(_RGB, "TIFF"),
    ".webp": _encode(_RGB, "WEBP"), ".ppm": _encode(_RGB, "PPM"),
    ".rgba.png": _encode(_RGB.convert("RGBA"), "PNG"),
    ".g16.png": _encode(Image.fromarray(_RNG.integers(0, 65536, (24, 32), dtype=np.uint16)), "PNG"),
    ".prog.jpg": _encode(_RGB, "JPEG", progressive=True),
}


def _decode_or_unreadable(root: Path, data: bytes, suffix: str) -> np.ndarray | None:
    path = root / f"frame{suffix}"
    path.write_bytes(data)
    try:
        frame = decode_image(path)
    except UnreadableFrame as e:
        assert str(e)
        return None
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 and frame.flags.c_contiguous
    assert max(frame.shape[:2]) <= MAX_SIDE and frame.shape[0] * frame.shape[1] <= MAX_PIXELS
    return frame


@pytest.fixture(scope="module")
def frame_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzzframes")


def test_the_real_images_decode(frame_dir: Path):
    for suffix, data in REAL.items():
        assert _decode_or_unreadable(frame_dir, data, suffix).shape == (24, 32, 3), suffix


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".png", ".jpg", ".bmp", ".gif", ".tif", ".webp", ".ppm"]))
def test_fuzz_random_bytes_decode_or_raise_unreadable(frame_dir: Path, data: bytes, suffix: str):
    _decode_or_unreadable(frame_dir, data, suffix)


@FUZZ
@given(kind=st.sampled_from(sorted(REAL)), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1),
                                                                                       st.integers(1, 255)), max_size=4))
def test_fuzz_truncated_and_corrupted_images_decode_or_raise_unreadable(frame_dir: Path, kind: str, cut: float,
                                                                        flips: list):
    data = bytearray(REAL[kind][:int(len(REAL[kind]) * cut)])
    for where, xor in flips:
        if data:
            data[int(where * (len(data) - 1))] ^= xor
    _decode_or_unreadable(frame_dir, bytes(data), kind[kind.rindex("."):])


def _png_header(w: int, h: int, mode: int = 2) -> bytes:
    """A PNG whose IHDR claims w x h (8-bit, colour type ``mode``), followed by a tiny image's data."""
    data = bytearray(REAL[".png"])
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, mode, 0, 0, 0)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def _jpeg_header(w: int, h: int) -> bytes:
    data = bytearray(REAL[".jpg"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _bmp_header(w: int, h: int) -> bytes:
    data = bytearray(REAL[".bmp"])
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def _gif_header(w: int, h: int) -> bytes:
    data = bytearray(REAL[".gif"])
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def _ppm_header(w: int, h: int) -> bytes:
    return f"P6\n{w} {h}\n255\n".encode() + REAL[".ppm"][-96:]


HEADERS = {".png": (_png_header, 2**31 - 1), ".jpg": (_jpeg_header, 65535), ".bmp": (_bmp_header, 2**31 - 1),
           ".gif": (_gif_header, 65535), ".ppm": (_ppm_header, 10**12)}


@FUZZ
@given(suffix=st.sampled_from(sorted(HEADERS)), data=st.data())
def test_fuzz_huge_declared_sizes_are_refused_before_decoding(frame_dir: Path, suffix: str, data):
    make, top = HEADERS[suffix]
    big = st.integers(MAX_SIDE + 1, top) | st.integers(8193, MAX_SIDE)  # over the side limit, or over the pixel limit
    w, h = data.draw(st.tuples(big, st.integers(8193, top)) | st.tuples(st.integers(8193, top), big))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    assert _decode_or_unreadable(frame_dir, make(w, h), suffix) is None
    assert time.perf_counter() - t0 < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 * 1024  # KiB: nothing was decoded


def test_declared_sizes_name_the_limit(frame_dir: Path):
    (frame_dir / "wide.png").write_bytes(_png_header(20000, 10))
    with pytest.raises(UnreadableFrame, match="larger than 16384 pixels on a side"):
        decode_image(frame_dir / "wide.png")
    (frame_dir / "bomb.png").write_bytes(_png_header(20000, 20000))  # Pillow refuses this one itself, on opening
    with pytest.raises(UnreadableFrame, match="decompression bomb|larger than 16384"):
        decode_image(frame_dir / "bomb.png")
    (frame_dir / "big.png").write_bytes(_png_header(16000, 9000))  # under Pillow's error limit: it only warns
    with pytest.raises(UnreadableFrame, match=f"more than {MAX_PIXELS} pixels"):
        decode_image(frame_dir / "big.png")


# --- frame arrays -------------------------------------------------------------------------------------

DTYPES = st.sampled_from([np.uint8, np.uint8, np.uint16, np.int8, np.int64, np.float16, np.float32, np.float64, bool,
                          np.complex64])


@FUZZ
@given(frames=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)))
def test_fuzz_frame_arrays_validate_or_raise_frame_error(frames: np.ndarray):
    try:
        out = validate_frames(frames)
    except FrameError as e:
        assert str(e)
        return
    assert out.dtype == np.uint8 and out.ndim == 4 and out.shape[3] == 3 and min(out.shape) >= 1
