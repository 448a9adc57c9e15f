"""certinfer: certified patch defenses, from training to a per-frame certificate at run time.

    import certinfer
    certifier = certinfer.load()              # the default bundle, its own threat
    verdicts = certifier(frames)              # (N, H, W, 3) uint8 RGB -> list[Verdict]

Everything heavy (onnxruntime, defenses, torch) is imported on first use, so ``import certinfer`` is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certinfer.runtime.verdict import Verdict

if TYPE_CHECKING:
    from certinfer.runtime.cascade import Cascade
    from certinfer.runtime.certifier import Certifier
    from certinfer.threat import Threat

__all__ = ["Verdict", "__version__", "bundle_names", "default_bundle", "example", "load", "sample_frames"]

try:
    __version__ = metadata.version("certinfer")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def default_bundle() -> Path:
    """The bundle shipped inside the package as ``default``."""
    from certinfer.runtime.packaged import data_dir

    return data_dir("default_bundle")


def bundle_names() -> list[str]:
    """The names of the bundles shipped inside the package (``default`` first): ``certinfer.load(name)``."""
    from certinfer.runtime.packaged import bundle_names as names

    return names()


def sample_frames() -> Path:
    """The folder of sample frames shipped inside the package."""
    from certinfer.runtime.packaged import data_dir

    return data_dir("samples")


def example(name: str = "roadside") -> Path:
    """A packaged example folder: frames and a detector's boxes for them (``detections.jsonl``)."""
    from certinfer.runtime.packaged import data_dir

    path = data_dir("examples") / name
    if not path.is_dir():
        raise FileNotFoundError(f"no packaged example {name!r}")
    return path


def load(bundle: str | os.PathLike | Sequence[str | os.PathLike] | None = None, backend: str = "auto",
         threat: str | Threat | None = None, expect_sha256: str | None = None,
         engine_options: dict[str, Any] | None = None, deadline_ms: float | None = None,
         on_uncertified: str = "uncertified") -> Certifier | Cascade:
    """A Certifier for ``bundle`` (a path, a packaged name such as ``"doublemask-gtsrb"``, or None / ``"default"``
    for the default bundle) against ``threat`` (None: the bundle's own).

    A list of several bundles gives a cascade (``["default", "doublemask-gtsrb"]``): they run in that order, and
    a frame is certified only when the stages that ran agree (see ``docs/guarantees.md``). ``deadline_ms`` skips
    the stages whose measured latency does not fit; ``on_uncertified="fail-safe"`` answers fail-safe where no
    stage certifies.

    ``expect_sha256`` pins the exact bundle (its digest, as ``certinfer inspect`` prints it): any other bundle,
    or this one edited and resealed, is refused with a BundleError. The manifest's own seal catches only
    accidental edits; the pin, kept in the configuration that validated the bundle, catches deliberate ones.
    It pins one bundle: with a list, it is refused. ``engine_options`` go to the engine backend (``threads``,
    ``device_id``, ``fp16``, ``cache_dir``); a torch backend gets the trainer's model builder unless they name
    a ``builder``.
    """
    from certinfer.runtime import loader

    return loader.load(bundle, backend=backend, threat=threat, expect_sha256=expect_sha256,
                       engine_options=_with_builder(backend, engine_options), deadline_ms=deadline_ms,
                       on_uncertified=on_uncertified)


def _with_builder(backend: str, engine_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The engine options, plus ``builder`` (``certinfer.train.models.build``) for a torch backend."""
    if not backend.startswith("torch") or engine_options and "builder" in engine_options:
        return engine_options
    try:
        from certinfer.train.models import build
    except ImportError:  # no torch: the engine says what to install
        return engine_options
    return {**(engine_options or {}), "builder": build}
