"""Write a bundle folder (engine files, then the sealed manifest with their hashes) and pack it as a .tar.

numpy/stdlib only: the export side of every defense calls this, and so may tools where torch is absent.
"""

from __future__ import annotations

import copy
import json
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path

from certinfer.runtime.bundle import (DIGEST_KEY, MANIFEST, SCHEMA, Bundle, BundleError, check_name,
                                      manifest_digest, sha256_file, validate_manifest)


def stage_bundle(out_dir: str | Path, manifest: dict, files: Mapping[str, Path | bytes]) -> Bundle:
    """Copy ``files`` (name -> source path or bytes) into ``out_dir``: the bundle ``manifest`` describes, before
    its ``manifest.json`` is written (:func:`write_manifest`), e.g. to measure it through the runtime first.

    Every engine entry gets the sha256 of its copied file; ``schema`` defaults to the current version. The
    manifest is validated before anything is written, and a ``manifest.json`` already in ``out_dir`` is removed
    first, so the folder is a loadable bundle only once :func:`write_manifest` has run.
    """
    out = Path(out_dir)
    m = copy.deepcopy(manifest)
    m.pop(DIGEST_KEY, None)
    m.setdefault("schema", SCHEMA)
    for e in m.get("engines") or []:
        if isinstance(e, dict):
            e["sha256"] = "0" * 64  # placeholder until the file is written: validation checks everything else first
    validate_manifest(m)
    for name in files:
        if check_name(name) == MANIFEST:
            raise BundleError(f"{MANIFEST} is written from the manifest argument, not from files")
    missing = sorted({e["file"] for e in m["engines"]} - set(files))
    if missing:
        raise BundleError(f"engine files not given to write_bundle: {missing}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for name, src in files.items():
        if isinstance(src, (bytes, bytearray, memoryview)):
            (out / name).write_bytes(src)
        else:
            shutil.copyfile(src, out / name)
    for e in m["engines"]:
        e["sha256"] = sha256_file(out / e["file"])  # the hash of what the bundle holds, not of the source
    return Bundle(path=out, manifest=m)


def write_manifest(bundle: Bundle) -> Path:
    """Validate, seal and write a staged bundle's manifest; returns the bundle folder."""
    bundle.manifest.pop(DIGEST_KEY, None)
    validate_manifest(bundle.manifest)
    _write_manifest(bundle.path, bundle.manifest)
    return bundle.path


def write_bundle(out_dir: str | Path, manifest: dict, files: Mapping[str, Path | bytes]) -> Path:
    """Copy ``files`` (name -> source path or bytes) into ``out_dir`` and write the sealed ``manifest.json``
    (see :func:`stage_bundle`); any digest given in ``manifest`` is replaced."""
    return write_manifest(stage_bundle(out_dir, manifest, files))


def rewrite_bundle(bundle: Bundle, manifest: dict, out: Path, new_files: Mapping[str, bytes | Path]) -> Path:
    """Write ``manifest`` with the bundle's (hash-checked) files it still names, plus ``new_files``, to ``out``."""
    files: dict[str, bytes | Path] = {e["file"]: bundle.read(e) for e in bundle.manifest["engines"]
                                      if any(e["file"] == m["file"] for m in manifest["engines"])}
    return write_bundle(out, manifest, {**files, **new_files})


def _write_manifest(folder: Path, m: dict) -> None:
    m[DIGEST_KEY] = manifest_digest(m)
    (folder / MANIFEST).write_text(json.dumps(m, sort_keys=True, indent=2) + "\n", encoding="utf-8")


def reseal(bundle_dir: str | Path) -> str:
    """Seal a bundle folder's manifest as it is now (its ``manifest_sha256`` recomputed); returns the digest.

    For a manifest edited on purpose, or one written before manifests were sealed: engine files are not touched
    (their hashes are still checked at load). This is also all an attacker needs to do after an edit, which is
    why a configuration that must run one exact bundle pins its digest (``load(..., expect_sha256=...)``).
    """
    folder = Path(bundle_dir)
    path = folder / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise BundleError(f"cannot reseal {path}: {str(err)[:200]}") from None
    if isinstance(m, dict):
        m.pop(DIGEST_KEY, None)
    validate_manifest(copy.deepcopy(m))  # never seal a manifest the loader would refuse anyway
    _write_manifest(folder, m)
    return m[DIGEST_KEY]


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # no owner names, ids or times from the machine that packed it
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def pack_tar(bundle_dir: str | Path, tar_path: str | Path) -> Path:
    """Pack a bundle folder as ``<folder name>/...`` in a tar (gzip when the name ends in .tar.gz or .tgz)."""
    src, dst = Path(bundle_dir).resolve(), Path(tar_path)
    if not (src / MANIFEST).is_file():
        raise BundleError(f"{src} is not a bundle folder (no {MANIFEST})")
    mode = "w:gz" if dst.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(dst, mode) as tar:
        tar.add(src, arcname=src.name, recursive=False, filter=_normalize)
        for path in sorted(src.iterdir()):
            if path.is_symlink() or not path.is_file():
                raise BundleError(f"cannot pack {path}: bundles hold plain files only")
            tar.add(path, arcname=f"{src.name}/{path.name}", filter=_normalize)
    return dst
