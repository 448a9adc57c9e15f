"""Load a bundle into its defense's Certifier: verify the bundle, open one engine per role, bind the threat."""

from __future__ import annotations

import os
from typing import Any

from certinfer.threat import Threat, parse
from certinfer.runtime import packaged
from certinfer.runtime.bundle import Bundle, load_bundle
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


def load(path: str | os.PathLike | None, backend: str = "auto", threat: str | Threat | None = None,
         expect_sha256: str | None = None, engine_options: dict[str, Any] | None = None) -> Certifier:
    """Verify the bundle at ``path`` (a path, a packaged name such as ``doublemask-gtsrb``, or None for the default
    bundle; hashes are checked before any engine is parsed) and build its Certifier.

    ``engine_options`` go to every engine's backend (``threads``, ``device_id``, ``fp16``, ``cache_dir``...).
    """
    return certifier_for(load_bundle(packaged.resolve(path), expect_sha256=expect_sha256), backend, threat,
                         engine_options)
