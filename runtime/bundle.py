"""Bundles: a folder (or a .tar of one) holding ``manifest.json`` and the engine files it names.

Loading validates the manifest (schema 1) and checks the sha256 of every engine file before any engine is
parsed or deserialized. Engines then read their bytes through :meth:`Bundle.read`, which hashes exactly the
bytes it returns, so a file swapped after loading is caught too. Nothing here unpickles anything.

The manifest itself is sealed: ``manifest_sha256`` is the sha256 of its canonical content (see
:func:`manifest_digest`), and a manifest that no longer matches it is refused. Because the manifest names every
engine file's sha256, that one digest identifies the whole bundle. A self-digest only catches accidental or
careless edits (geometry, threat, defense parameters): whoever can edit the manifest can recompute the digest
too. Against a deliberate edit, pin the digest outside the bundle: ``load_bundle(path, expect_sha256=...)``
(``certinfer.load(..., expect_sha256=...)``, ``certinfer run --bundle-sha256``) refuses any other bundle.
Schema-1 bundles written before manifests were sealed still load, with an :class:`UnsealedBundleWarning`.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from certinfer.threat import ThreatError, parse
from certinfer.runtime.frames import MAX_SIDE  # input and output sizes a manifest may declare

SCHEMA = 1
MANIFEST = "manifest.json"
FORMATS = ("onnx", "tensorrt", "torch")  # torch: safetensors weights rebuilt by a model builder (parity only)
RESIZE_MODES = ("bilinear",)
MAX_MANIFEST_BYTES = 16 << 20
MAX_THREAT_CHARS = 1024  # a manifest's threat spec; keeps parsing it bounded work
DIGEST_KEY = "manifest_sha256"  # the manifest's own seal: sha256 of its canonical content without this key
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ValueError):
    """A bundle that cannot be trusted or used: bad manifest, missing or altered file, unsafe archive."""


class UnsealedBundleWarning(UserWarning):
    """A manifest without ``manifest_sha256`` (written before manifests were sealed): edits go unnoticed."""


@dataclass
class Bundle:
    path: Path
    manifest: dict
    digest: str = ""  # manifest_digest of the manifest as loaded: what a pin compares
    # a .tar bundle's unpacked copy: lives as long as the Bundle
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False, compare=False)

    def engines(self, role: str = "model") -> list[dict]:
        """The engine entries for one role (``"model"`` unless a defense ships several graphs)."""
        return [e for e in self.manifest["engines"] if e["role"] == role]

    def file(self, entry: dict) -> Path:
        """Where an engine entry's file lies, checked to be a plain file inside the bundle."""
        return _inside(self.path, entry["file"])

    def read(self, entry: dict) -> bytes:
        """The entry's bytes, hashed again as read: what the engine parses is exactly what was verified."""
        data = self.file(entry).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise BundleError(f"{entry['file']}: sha256 changed since the bundle was loaded")
        return data


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed (plans and models can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's canonical JSON (sorted keys, no whitespace, ASCII), without ``manifest_sha256``.

    The manifest lists every engine file's sha256, so this digest stands for the whole bundle: it is the
    value to pin (``expect_sha256``). It is computed on the manifest as read, before defaults are filled in.
    """
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (ValueError, TypeError, RecursionError) as err:
        raise BundleError(f"manifest has no canonical JSON form: {str(err)[:200]}") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def check_name(name: object) -> str:
    """A file name a manifest may use: one plain path component, no traversal."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or PurePosixPath(name).name != name or re.match(r"^[A-Za-z]:", name)):
        raise BundleError(f"engine file {name!r} must be a plain file name inside the bundle")
    return name


def _inside(root: Path, name: str) -> Path:
    path = root / check_name(name)
    try:
        if not path.exists():
            raise BundleError(f"bundle {root} is missing the file {name!r}")
        if not path.resolve().is_relative_to(root.resolve()):
            raise BundleError(f"{name!r} links outside the bundle {root}")
        if not path.is_file():
            raise BundleError(f"{name!r} in bundle {root} is not a regular file")
    except (OSError, RuntimeError) as err:  # e.g. a name too long for the file system, a symlink loop
        raise BundleError(f"bundle {root}: cannot use the file {name[:80]!r}: {err}") from None
    return path


# --- manifest validation ---------------------------------------------------------------------------------

def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and v == v and abs(v) != float("inf")


def _need(d: dict, key: str, kind: type, where: str = ""):
    path = f"{where}.{key}" if where else key
    if key not in d:
        raise BundleError(f"manifest is missing {path!r}")
    v = d[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise BundleError(f"manifest: {path} must be {kind.__name__}, got {type(v).__name__}")
    return v


def _short(v: object, limit: int = 80) -> str:
    """A value for an error message: its repr, cut short (a manifest may hold anything, deeply nested)."""
    try:
        text = repr(v)
    except RecursionError:
        text = f"<deeply nested {type(v).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _pair(v: object, where: str, low: int, high: int | None = None) -> list[int]:
    if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= low for x in v)):
        raise BundleError(f"manifest: {where} must be a pair of integers >= {low}, got {_short(v)}")
    if high is not None and max(v) > high:
        raise BundleError(f"manifest: {where} must be at most {high} per side, got {_short(v)}")
    return v


def _check_schema(m: object) -> None:
    if not isinstance(m, dict):
        raise BundleError(f"manifest must be a JSON object, got {type(m).__name__}")
    if "schema" not in m:
        raise BundleError("manifest has no 'schema' version")
    if not _is_int(m["schema"]) or m["schema"] != SCHEMA:
        raise BundleError(f"unsupported bundle schema {_short(m['schema'])}: this certinfer reads schema {SCHEMA}")


def _check_input(inp: dict) -> None:
    _pair(_need(inp, "hw", list, "input"), "input.hw", 1, MAX_SIDE)
    c = _need(inp, "channels", int, "input")
    if c < 1:
        raise BundleError(f"manifest: input.channels must be >= 1, got {c}")
    for key in ("mean", "std"):
        v = _need(inp, key, list, "input")
        if len(v) != c or not all(_is_num(x) for x in v):
            raise BundleError(f"manifest: input.{key} must be {c} numbers (one per channel), got {_short(v)}")
    if min(inp["std"]) <= 0:
        raise BundleError(f"manifest: input.std must be positive, got {_short(inp['std'])}")
    classes = _need(inp, "classes", list, "input")
    if not classes or not all(isinstance(x, str) for x in classes):
        raise BundleError("manifest: input.classes must be a non-empty list of class names")
    if inp.setdefault("resize", "bilinear") not in RESIZE_MODES:
        raise BundleError(f"manifest: input.resize {_short(inp['resize'])} is not one of {RESIZE_MODES}")


def _check_geometry(g: dict) -> None:
    for key, low in (("rf", 1), ("stride", 1), ("padding", 0), ("input_hw", 1), ("output_hw", 1)):
        _pair(_need(g, key, list, "geometry"), f"geometry.{key}", low, MAX_SIDE)


def _check_probe(p: dict) -> None:
    # the runtime trusts cells near the threshold only on the backends listed here: a list of names, exactly
    exact = p.get("exact_backends", [])
    if not (isinstance(exact, list) and all(isinstance(b, str) for b in exact)):
        raise BundleError(f"manifest: probe.exact_backends must be a list of backend names, got {_short(exact)}")


def _check_engine(e: object, i: int) -> None:
    where = f"engines[{i}]"
    if not isinstance(e, dict):
        raise BundleError(f"manifest: {where} must be an object, got {type(e).__name__}")
    try:
        check_name(_need(e, "file", str, where))
    except BundleError as err:
        raise BundleError(f"manifest: {where}: {err}") from None
    if _need(e, "format", str, where) not in FORMATS:
        raise BundleError(f"manifest: {where}.format {_short(e['format'])} is not one of {FORMATS}")
    _need(e, "precision", str, where)
    if not _SHA256.match(_need(e, "sha256", str, where)):
        raise BundleError(f"manifest: {where}.sha256 must be 64 lowercase hex digits")
    e.setdefault("role", "model")
    _need(e, "role", str, where)
    lo, hi = _pair(_need(e, "batch", list, where), f"{where}.batch", 1)
    if lo > hi:
        raise BundleError(f"manifest: {where}.batch [min, max] has min > max: {_short(e['batch'])}")
    if e["format"] == "tensorrt":
        _need(e, "gpu", str, where)
        _need(e, "tensorrt_version", str, where)


def validate_manifest(m: object) -> dict:
    """Check a manifest against schema 1 (filling defaults: engine role ``model``, input resize ``bilinear``)."""
    _check_schema(m)
    defense = _need(m, "defense", dict)
    _need(defense, "kind", str, "defense")
    _need(defense, "params", dict, "defense")
    _check_input(_need(m, "input", dict))
    if "geometry" in m:
        _check_geometry(_need(m, "geometry", dict))
    if "probe" in m:
        _check_probe(_need(m, "probe", dict))
    threat = _need(m, "threat", str)
    if len(threat) > MAX_THREAT_CHARS:
        raise BundleError(f"manifest: threat is longer than {MAX_THREAT_CHARS} characters")
    try:
        parse(threat, tuple(m["input"]["hw"]))
    except ThreatError as err:
        raise BundleError(f"manifest: threat: {err}") from None
    engines = _need(m, "engines", list)
    if not engines:
        raise BundleError("manifest: engines is empty")
    for i, e in enumerate(engines):
        _check_engine(e, i)
    _need(m, "provenance", dict)
    if DIGEST_KEY in m and not (isinstance(m[DIGEST_KEY], str) and _SHA256.match(m[DIGEST_KEY])):
        raise BundleError(f"manifest: {DIGEST_KEY} must be 64 lowercase hex digits")
    return m


# --- loading ---------------------------------------------------------------------------------------------

def _read_manifest(root: Path) -> dict:
    path = _inside(root, MANIFEST)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    # ValueError: also bad UTF-8 and integers past Python's digit limit; RecursionError: nesting too deep
    except (ValueError, RecursionError) as err:
        raise BundleError(f"{path} is not valid JSON: {str(err)[:200]}") from None


def _verify_files(root: Path, engines: list[dict]) -> None:
    for e in engines:
        actual = sha256_file(_inside(root, e["file"]))
        if actual != e["sha256"]:
            raise BundleError(f"{e['file']}: sha256 mismatch (manifest {e['sha256'][:12]}..., "
                              f"file {actual[:12]}...): the file was altered or does not belong to this manifest")


def _pin(expect_sha256: str | None) -> str | None:
    if expect_sha256 is None:
        return None
    pin = str(expect_sha256).strip().lower()
    if not _SHA256.match(pin):
        raise BundleError(f"the pinned bundle digest must be 64 hex digits, got {_short(expect_sha256)}")
    return pin


def _check_seal(root: Path, manifest: dict, digest: str, pin: str | None) -> None:
    """The manifest must match its own seal, and the whole bundle the pinned digest (when one is given)."""
    sealed = manifest.get(DIGEST_KEY)
    if sealed is not None and sealed != digest:
        raise BundleError(f"manifest was modified after export: its content hashes to {digest[:16]}..., but it was "
                          f"sealed as {sealed[:16]}... (re-export the bundle; reseal it only if the edit is yours)")
    if pin is not None and digest != pin:
        raise BundleError(f"bundle {root} is not the pinned bundle: its digest is {digest[:16]}..., the pin "
                          f"{pin[:16]}... (a different or modified bundle)")
    if sealed is None and pin is None:
        warnings.warn(f"bundle {root}: manifest is not sealed (no {DIGEST_KEY}; written before certinfer sealed "
                      f"manifests), so edits to it cannot be detected; reseal it or pin its digest {digest}",
                      UnsealedBundleWarning, stacklevel=4)


def _load_folder(root: Path, tmp: tempfile.TemporaryDirectory | None = None, pin: str | None = None) -> Bundle:
    raw = _read_manifest(root)
    digest = manifest_digest(raw) if isinstance(raw, dict) else ""  # before validation fills in defaults
    manifest = validate_manifest(raw)
    _check_seal(root, manifest, digest, pin)
    _verify_files(root, manifest["engines"])
    return Bundle(path=root, manifest=manifest, digest=digest, _tmp=tmp)


def _check_member(m: tarfile.TarInfo) -> bool:
    """Refuse unsafe members; True for members to extract (the archive's own ``.`` entry is skipped)."""
    parts = PurePosixPath(m.name).parts
    if not parts and m.isdir():
        return False
    if not parts or m.name.startswith("/") or re.match(r"^[A-Za-z]:", m.name) or ".." in parts or "\\" in m.name:
        raise BundleError(f"unsafe path in bundle archive: {m.name!r}")
    if not (m.isfile() or m.isdir()):
        raise BundleError(f"bundle archive member {m.name!r} is a link or special file; "
                          "only files and folders are allowed")
    return True


def _bundle_root(tmp: Path) -> Path:
    if (tmp / MANIFEST).is_file():
        return tmp
    subdirs = [p for p in tmp.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / MANIFEST).is_file():
        return subdirs[0]
    raise BundleError(f"bundle archive has no {MANIFEST} at its top or in a single top folder")


def _load_tar(path: Path, pin: str | None = None) -> Bundle:
    tmp = tempfile.TemporaryDirectory(prefix="certinfer-bundle-")  # private (0700), removed with the Bundle
    try:
        with tarfile.open(path, "r:*") as tar:
            # every member is checked before anything is written
            members = [m for m in tar.getmembers() if _check_member(m)]
            if hasattr(tarfile, "data_filter"):  # the stdlib's own guard as well, where this Python has it
                tar.extractall(tmp.name, members=members, filter="data")
            else:
                tar.extractall(tmp.name, members=members)
        return _load_folder(_bundle_root(Path(tmp.name)), tmp, pin)
    except BundleError:
        tmp.cleanup()
        raise
    except Exception as err:  # TarError, OSError, and what the decompressors raise (EOFError, zlib.error, ...)
        tmp.cleanup()
        raise BundleError(f"cannot unpack bundle archive {path}: {type(err).__name__}: {err}") from None


def load_bundle(path: str | Path, expect_sha256: str | None = None) -> Bundle:
    """Load and verify a bundle folder or ``.tar`` (optionally compressed) of one; any failure is a BundleError.

    ``expect_sha256``: the bundle's digest (:func:`manifest_digest`, shown by ``certinfer inspect``) as pinned
    by the configuration that validated it; any other bundle is refused, sealed or not.
    """
    path = Path(path)
    pin = _pin(expect_sha256)
    try:
        if path.is_dir():
            return _load_folder(path, pin=pin)
        if path.is_file():
            try:
                is_tar = tarfile.is_tarfile(path)
            except Exception as err:  # a truncated or corrupt compressed archive (EOFError, zlib.error, ...)
                raise BundleError(f"cannot unpack bundle archive {path}: {type(err).__name__}: {err}") from None
            if not is_tar:
                raise BundleError(f"{path} is neither a bundle folder nor a tar archive of one")
            return _load_tar(path, pin)
    except OSError as err:  # unreadable files (permissions, I/O errors) while reading or hashing
        raise BundleError(f"cannot read bundle {path}: {err}") from None
    raise BundleError(f"bundle {path} does not exist")
