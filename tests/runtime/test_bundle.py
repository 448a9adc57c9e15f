"""Bundles: writing, loading, hash verification, manifest validation and safe .tar unpacking."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import tarfile
import tempfile
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from certinfer.export.bundle_writer import pack_tar, reseal, write_bundle
from certinfer.runtime.bundle import SCHEMA, BundleError, UnsealedBundleWarning, load_bundle, manifest_digest
from certinfer.runtime.engines import load_engine

WEIGHT = np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1)


def tiny_onnx() -> bytes:
    """A real ONNX graph: one 1x1 convolution, 3 -> 2 channels, dynamic batch."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 4, 4])],
        [numpy_helper.from_array(WEIGHT, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


MODEL = tiny_onnx()


def manifest() -> dict:
    return {
        "defense": {"kind": "test", "params": {"threshold": 0.0}},
        "input": {"hw": [4, 4], "channels": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "classes": ["a", "b"], "resize": "bilinear"},
        "geometry": {"rf": [1, 1], "stride": [1, 1], "padding": [0, 0], "input_hw": [4, 4], "output_hw": [4, 4]},
        "threat": "2x2",
        "engines": [{"file": "model.onnx", "format": "onnx", "precision": "fp32", "batch": [1, 8]}],
        "provenance": {"commit": "test"},
    }


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle", manifest(), {"model.onnx": MODEL})


def edit_manifest(root: Path, edit, seal: bool = True) -> None:
    """Edit the manifest; ``seal``: and rewrite its digest too, as a deliberate editor (or attacker) would."""
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))
    if seal:
        reseal(root)


def test_write_and_load_roundtrip(bundle_dir: Path):
    b = load_bundle(bundle_dir)
    (entry,) = b.engines()
    assert b.manifest["schema"] == SCHEMA and entry["role"] == "model"
    assert entry["sha256"] == hashlib.sha256(MODEL).hexdigest()
    assert b.file(entry) == bundle_dir / "model.onnx" and b.read(entry) == MODEL
    assert b.engines("bounds") == []
    text = (bundle_dir / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_writer_copies_paths_and_extra_files(tmp_path: Path):
    src = tmp_path / "src.onnx"
    src.write_bytes(MODEL)
    out = write_bundle(tmp_path / "b", manifest(), {"model.onnx": src, "notes.txt": b"hello"})
    assert (out / "notes.txt").read_bytes() == b"hello"
    assert load_bundle(out).read(load_bundle(out).engines()[0]) == MODEL


def test_tampered_engine_byte_is_refused(bundle_dir: Path):
    data = bytearray(MODEL)
    data[len(data) // 2] ^= 1
    (bundle_dir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bundle_dir)


def test_edited_manifest_hash_is_refused(bundle_dir: Path):
    edit_manifest(bundle_dir, lambda m: m["engines"][0].update(sha256=hashlib.sha256(b"other").hexdigest()))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(bundle_dir)


def test_renamed_engine_file_in_manifest_is_refused(bundle_dir: Path):
    edit_manifest(bundle_dir, lambda m: m["engines"][0].update(file="renamed.onnx"))
    with pytest.raises(BundleError, match="missing the file 'renamed.onnx'"):
        load_bundle(bundle_dir)


def test_missing_engine_file_is_refused(bundle_dir: Path):
    (bundle_dir / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing the file 'model.onnx'"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("schema", [2, 0, "1", None, True])
def test_unknown_schema_is_refused(bundle_dir: Path, schema):
    edit_manifest(bundle_dir, lambda m: m.update(schema=schema), seal=False)
    with pytest.raises(BundleError, match="unsupported bundle schema"):
        load_bundle(bundle_dir)


def test_swap_after_load_is_caught_on_read(bundle_dir: Path):
    b = load_bundle(bundle_dir)
    (bundle_dir / "model.onnx").write_bytes(MODEL + b"\0")
    with pytest.raises(BundleError, match="changed since"):
        b.read(b.engines()[0])


# --- manifest seal and pin ---------------------------------------------------------------------------

def test_written_manifest_is_sealed(tmp_path: Path, bundle_dir: Path):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["manifest_sha256"] == manifest_digest(m) == load_bundle(bundle_dir).digest
    bogus = write_bundle(tmp_path / "b2", {**manifest(), "manifest_sha256": "0" * 64}, {"model.onnx": MODEL})
    assert load_bundle(bogus).digest == load_bundle(bundle_dir).digest  # a given digest is replaced


@pytest.mark.parametrize("edit", [
    lambda m: m["geometry"].update(rf=[1, 1], padding=[0, 0], stride=[2, 2], output_hw=[2, 2]),
    lambda m: m.update(threat="1x1"),
    lambda m: m["defense"]["params"].update(threshold=0.5),
    lambda m: m["input"].update(mean=[0.0, 0.0, 0.0]),
    lambda m: m.update(probe={"exact_backends": ["onnxruntime-cuda"]}),
    lambda m: m["engines"][0].update(sha256=hashlib.sha256(b"other").hexdigest()),
    lambda m: m["provenance"].update(commit="someone else's"),
], ids=["geometry", "threat", "defense-params", "input", "exact-backends", "engine-hash", "provenance"])
def test_unsealed_manifest_edit_is_refused(bundle_dir: Path, edit):
    edit_manifest(bundle_dir, edit, seal=False)
    with pytest.raises(BundleError, match="manifest was modified after export"):
        load_bundle(bundle_dir)


def test_seal_ignores_formatting_and_key_order(bundle_dir: Path):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    (bundle_dir / "manifest.json").write_text(json.dumps(dict(reversed(list(m.items())))))  # one line, other order
    assert load_bundle(bundle_dir).digest == m["manifest_sha256"]


def test_pin_refuses_a_resealed_edit_and_any_other_bundle(tmp_path: Path, bundle_dir: Path):
    pin = load_bundle(bundle_dir).digest
    assert load_bundle(bundle_dir, expect_sha256=f" {pin.upper()}\n").digest == pin
    edit_manifest(bundle_dir, lambda m: m.update(threat="1x1"))  # a smaller threat, digest rewritten too
    assert load_bundle(bundle_dir).digest != pin  # resealed: the seal alone cannot tell
    with pytest.raises(BundleError, match="is not the pinned bundle"):
        load_bundle(bundle_dir, expect_sha256=pin)
    other = write_bundle(tmp_path / "other", {**manifest(), "threat": "2x1"}, {"model.onnx": MODEL})
    with pytest.raises(BundleError, match="is not the pinned bundle"):
        load_bundle(other, expect_sha256=pin)


@pytest.mark.parametrize("pin", ["abc", "g" * 64, "0" * 63, ""])
def test_pin_must_be_a_sha256(bundle_dir: Path, pin: str):
    with pytest.raises(BundleError, match="must be 64 hex digits"):
        load_bundle(bundle_dir, expect_sha256=pin)


def test_pin_applies_to_tar_bundles(tmp_path: Path, bundle_dir: Path):
    pin = load_bundle(bundle_dir).digest
    tar = pack_tar(bundle_dir, tmp_path / "b.tar.gz")
    before = leftover_temp_dirs()
    assert load_bundle(tar, expect_sha256=pin).digest == pin
    with pytest.raises(BundleError, match="is not the pinned bundle"):
        load_bundle(tar, expect_sha256="0" * 64)
    gc.collect()
    assert leftover_temp_dirs() == before


def test_unsealed_schema_1_manifest_loads_with_a_warning(bundle_dir: Path):
    edit_manifest(bundle_dir, lambda m: m.pop("manifest_sha256"), seal=False)  # as written before sealing
    with pytest.warns(UnsealedBundleWarning, match="not sealed.*pin its digest"):
        digest = load_bundle(bundle_dir).digest
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_bundle(bundle_dir, expect_sha256=digest).digest == digest  # a pin covers it: no warning
        assert reseal(bundle_dir) == digest  # sealing adds the digest and changes nothing else
        assert load_bundle(bundle_dir).manifest["manifest_sha256"] == digest


def test_malformed_seal_is_refused_and_reseal_checks_the_manifest(bundle_dir: Path):
    edit_manifest(bundle_dir, lambda m: m.update(manifest_sha256="not a digest"), seal=False)
    with pytest.raises(BundleError, match="manifest_sha256 must be 64 lowercase hex digits"):
        load_bundle(bundle_dir)
    edit_manifest(bundle_dir, lambda m: m.pop("defense"), seal=False)
    with pytest.raises(BundleError, match="missing 'defense'"):
        reseal(bundle_dir)


BAD = [
    (lambda m: m.pop("defense"), "missing 'defense'"),
    (lambda m: m["defense"].update(params=[]), "defense.params must be dict"),
    (lambda m: m["input"].update(hw=[4]), "input.hw must be a pair"),
    (lambda m: m["input"].update(mean=[0.5]), "input.mean must be 3 numbers"),
    (lambda m: m["input"].update(std=[1, 0, 1]), "input.std must be positive"),
    (lambda m: m["input"].update(classes=[]), "input.classes"),
    (lambda m: m["input"].update(resize="lanczos"), "input.resize"),
    (lambda m: m["geometry"].update(padding=[-1, 0]), "geometry.padding"),
    (lambda m: m.update(threat="9x9"), "larger than the 4x4 input"),
    (lambda m: m.pop("threat"), "missing 'threat'"),
    (lambda m: m.update(engines=[]), "engines is empty"),
    (lambda m: m["engines"][0].update(format="pickle"), "format 'pickle'"),
    (lambda m: m["engines"][0].update(batch=[4, 2]), "min > max"),
    (lambda m: m["engines"][0].update(batch=[0, 2]), "batch must be a pair of integers >= 1"),
    (lambda m: m["engines"][0].pop("precision"), "missing 'engines[0].precision'"),
    (lambda m: m["engines"][0].update(format="tensorrt"), "missing 'engines[0].gpu'"),
    (lambda m: m["engines"][0].update(file="../model.onnx"), "plain file name"),
    (lambda m: m["engines"][0].update(file="/etc/passwd"), "plain file name"),
    (lambda m: m["engines"][0].update(file="sub/model.onnx"), "plain file name"),
    (lambda m: m.pop("provenance"), "missing 'provenance'"),
]


@pytest.mark.parametrize("edit, message", BAD)
def test_invalid_manifest_is_refused_before_writing(tmp_path: Path, edit, message):
    m = manifest()
    edit(m)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace("[", r"\[")):
        write_bundle(tmp_path / "b", m, {"model.onnx": MODEL})
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("edit, message", BAD[:3] + BAD[-4:-1])
def test_invalid_manifest_is_refused_on_load(bundle_dir: Path, edit, message):
    edit_manifest(bundle_dir, edit, seal=False)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_bundle(bundle_dir)


def test_engine_symlink_out_of_the_bundle_is_refused(tmp_path: Path, bundle_dir: Path):
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(MODEL)  # same bytes: the hash alone would pass
    (bundle_dir / "model.onnx").unlink()
    (bundle_dir / "model.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="links outside"):
        load_bundle(bundle_dir)


def test_not_a_bundle(tmp_path: Path):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "file.bin").write_bytes(b"not a tar")
    with pytest.raises(BundleError, match="neither a bundle folder nor a tar"):
        load_bundle(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="missing the file 'manifest.json'"):
        load_bundle(tmp_path / "empty")


# --- .tar bundles ---------------------------------------------------------------------------------------

def leftover_temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("certinfer-bundle-*")}


@pytest.mark.parametrize("name", ["bundle.tar", "bundle.tar.gz"])
def test_good_tar_loads_into_a_private_temp_dir(tmp_path: Path, bundle_dir: Path, name: str):
    tar = pack_tar(bundle_dir, tmp_path / name)
    b = load_bundle(tar)
    assert b.path.name == "bundle" and b.path.parent.name.startswith("certinfer-bundle-")
    assert b.path.parent.stat().st_mode & 0o077 == 0
    assert b.read(b.engines()[0]) == MODEL
    x = np.ones((2, 3, 4, 4), np.float32)
    assert np.allclose(load_engine(b, "onnxruntime-cpu").run(x), WEIGHT.sum(axis=1).reshape(1, 2, 1, 1))
    root = b.path.parent
    del b
    gc.collect()
    assert not root.exists()


def test_tar_with_dot_entries_loads(tmp_path: Path, bundle_dir: Path):
    path = tmp_path / "dot.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(bundle_dir, arcname=".")
    assert load_bundle(path).read(load_bundle(path).engines()[0]) == MODEL


def evil_tar(path: Path, bundle_dir: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    """A tar of a good bundle plus one hostile member, added first so it would be extracted first."""
    with tarfile.open(path, "w") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
        tar.add(bundle_dir, arcname="bundle")
    return path


def file_member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


@pytest.mark.parametrize("prefix", ["../", "bundle/../../", "/tmp/"])
def test_traversal_tar_is_refused_and_writes_nothing(tmp_path: Path, bundle_dir: Path, prefix: str):
    target = f"certinfer-evil-{uuid.uuid4().hex}"
    before = leftover_temp_dirs()
    tar = evil_tar(tmp_path / "evil.tar", bundle_dir, file_member(prefix + target, b"pwned"), b"pwned")
    with pytest.raises(BundleError, match="unsafe path"):
        load_bundle(tar)
    for folder in (Path(tempfile.gettempdir()), Path("/tmp"), tmp_path, tmp_path.parent):
        assert not (folder / target).exists()
    assert leftover_temp_dirs() == before


def link_member(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member", [
    link_member("bundle/model.onnx", "/etc/passwd", tarfile.SYMTYPE),
    link_member("bundle/out", "../../..", tarfile.SYMTYPE),
    link_member("bundle/model.onnx", "/etc/passwd", tarfile.LNKTYPE),
    link_member("bundle/tty", "", tarfile.CHRTYPE),
    link_member("bundle/fifo", "", tarfile.FIFOTYPE),
], ids=["symlink-file", "symlink-dir", "hardlink", "device", "fifo"])
def test_tar_with_links_or_devices_is_refused(tmp_path: Path, bundle_dir: Path, member: tarfile.TarInfo):
    before = leftover_temp_dirs()
    with pytest.raises(BundleError, match="link or special file"):
        load_bundle(evil_tar(tmp_path / "evil.tar", bundle_dir, member))
    assert leftover_temp_dirs() == before


def test_tampered_tar_is_refused(tmp_path: Path, bundle_dir: Path):
    data = bytearray(MODEL)
    data[-1] ^= 0xFF
    (bundle_dir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(pack_tar(bundle_dir, tmp_path / "b.tar"))


def test_tar_without_manifest_is_refused(tmp_path: Path):
    path = tmp_path / "empty.tar"
    with tarfile.open(path, "w") as tar:
        tar.addfile(file_member("a/model.onnx", MODEL), io.BytesIO(MODEL))
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(path)


def test_writer_refuses_missing_engine_file_and_manifest_override(tmp_path: Path):
    with pytest.raises(BundleError, match="not given"):
        write_bundle(tmp_path / "b", manifest(), {})
    with pytest.raises(BundleError, match="written from the manifest"):
        write_bundle(tmp_path / "b", manifest(), {"model.onnx": MODEL, "manifest.json": b"{}"})
    with pytest.raises(BundleError, match="plain file name"):
        write_bundle(tmp_path / "b", manifest(), {"model.onnx": MODEL, "../x": b""})
