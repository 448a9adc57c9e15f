"""Load a bundle into its defense's Certifier: verify the bundle, open one engine per role, bind the threat."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from certinfer.threat import Threat, parse
from certinfer.runtime import packaged
from certinfer.runtime.bundle import Bundle, load_bundle
from certinfer.runtime.cascade import Cascade
from certinfer.runtime.certifier import Certifier
from certinfer.runtime.defenses import certifier_class
from certinfer.runtime.engines import BACKENDS, load_engine


def open_engines(bundle: Bundle, roles: tuple[str, ...], backend: str = "auto",
                 engine_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One engine per role; roles after the first run on the backend the first one resolved to."""
    options = dict(engine_options or {})
    engines: dict[str, Any] = {}
    for role in roles:
        engines[role] = load_engine(bundle, backend=backend, role=role, **options)
        if engines[role].name in BACKENDS:
            backend = engines[role].name
    return engines


def certifier_for(bundle: Bundle, backend: str = "auto", threat: str | Threat | None = None,
                  engine_options: dict[str, Any] | None = None) -> Certifier:
    """The Certifier of an already loaded (verified) bundle."""
    cls = certifier_class(bundle.manifest["defense"]["kind"])
    spec = bundle.manifest["threat"] if threat is None else threat
    parsed = parse(spec, input_hw=tuple(bundle.manifest["input"]["hw"])) if isinstance(spec, str) else spec
    return cls(bundle, open_engines(bundle, cls.roles_for(bundle.manifest), backend, engine_options), parsed)


def load(path: str | os.PathLike | Sequence[str | os.PathLike] | None, backend: str = "auto",
         threat: str | Threat | None = None, expect_sha256: str | None = None,
         engine_options: dict[str, Any] | None = None, deadline_ms: float | None = None,
         on_uncertified: str = "uncertified") -> Certifier | Cascade:
    """Verify the bundle at ``path`` (a path, a packaged name such as ``doublemask-gtsrb``, or None for the default
    bundle; hashes are checked before any engine is parsed) and build its Certifier.

    A list of several bundles gives a :class:`Cascade` of their certifiers in that order, each stage named by
    the string given (one bundle in a list: its plain Certifier). ``deadline_ms`` and ``on_uncertified`` are the
    cascade's; set on a single bundle, they make a one-stage cascade. ``expect_sha256`` pins a single bundle.
    ``engine_options`` go to every engine's backend (``threads``, ``device_id``, ``fp16``, ``cache_dir``...).
    """
    cascade = {"deadline_ms": deadline_ms, "on_uncertified": on_uncertified}
    if isinstance(path, (list, tuple)):
        if expect_sha256 is not None:
            raise ValueError("expect_sha256 pins one bundle; it cannot be given with a list of bundles")
        if not path:
            raise ValueError("an empty list of bundles")
        if len(path) > 1:
            return Cascade([(_stage_name(p), load(p, backend, threat, None, engine_options)) for p in path], **cascade)
        path = path[0]
    certifier = certifier_for(load_bundle(packaged.resolve(path), expect_sha256=expect_sha256), backend, threat,
                              engine_options)
    if deadline_ms is None and on_uncertified == "uncertified":
        return certifier
    return Cascade([(_stage_name(path), certifier)], **cascade)


def _stage_name(path: str | os.PathLike | None) -> str:
    return packaged.DEFAULT if path is None else str(path)
