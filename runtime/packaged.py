"""What ships inside the package: the default bundle, bundles by name, and the sample frames.

A bundle is named ``<defense>-<dataset>`` (``doublemask-gtsrb``), with a suffix for a variant of the same defense
(``doublemask-gtsrb-feature``), after its folder under ``certinfer/data/bundles``;
``default`` is the default bundle, also loaded by its own name (``bagcert-gtsrb``). Anything else given where a bundle is expected is a path.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DEFAULT = "default"
DEFAULT_IS = "bagcert-gtsrb"  # the default bundle's own name, which loads it too


def data_dir(name: str) -> Path:
    """A folder of the package's data (``default_bundle``, ``samples``, ``bundles``); FileNotFoundError without it."""
    path = Path(str(resources.files("certinfer") / "data" / name))
    if not path.is_dir():
        raise FileNotFoundError(f"this install has no packaged {name.replace('_', ' ')}; name a bundle path instead")
    return path


def bundle_names() -> list[str]:
    """The names of the bundles shipped in the package, ``default`` first."""
    try:
        named = sorted(p.name for p in data_dir("bundles").iterdir() if (p / "manifest.json").is_file())
    except FileNotFoundError:
        named = []
    return [DEFAULT, *named]


def resolve(bundle: str | os.PathLike | None) -> Path:
    """The folder of a bundle given by path, by packaged name, or None for the default bundle.

    An existing path wins over a name; a bare name that is neither says which names exist.
    """
    if bundle is None or str(bundle) in (DEFAULT, DEFAULT_IS):
        return data_dir("default_bundle")
    path = Path(bundle)
    if path.exists() or len(path.parts) != 1 or path.suffix:
        return path
    if path.name in bundle_names():
        return data_dir("bundles") / path.name
    raise FileNotFoundError(f"no bundle {str(bundle)!r}: not a path, and not a packaged bundle "
                            f"({', '.join(bundle_names())})")
