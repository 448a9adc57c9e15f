"""Defense registry: a bundle's ``defense.kind`` -> its Certifier class, imported only when asked for."""

from __future__ import annotations

from importlib import import_module

from certinfer.runtime.certifier import Certifier

# kind -> "module:Class"; modules are imported lazily so loading one defense never pulls the others.
_KINDS: dict[str, str] = {
    "bagcert": "certinfer.runtime.defenses.bagcert:BagCertCertifier",
    "masking": "certinfer.runtime.defenses.masking:MaskingCertifier",
    "cropping": "certinfer.runtime.defenses.cropping:CroppingCertifier",
    "ibp": "certinfer.runtime.defenses.ibp:IBPCertifier",
    "scalecert": "certinfer.runtime.defenses.scalecert:ScaleCertCertifier",
}
_CLASSES: dict[str, type[Certifier]] = {}


class DefenseError(ValueError):
    """A defense kind this install does not know or cannot load."""


def register(kind: str, cls: type[Certifier]) -> None:
    """Make ``kind`` resolve to ``cls`` (tests, extensions); replaces an earlier registration."""
    if not (isinstance(cls, type) and issubclass(cls, Certifier)):
        raise TypeError(f"defense {kind!r}: {cls!r} is not a Certifier subclass")
    _CLASSES[kind] = cls


def known_kinds() -> tuple[str, ...]:
    return tuple(sorted({*_KINDS, *_CLASSES}))


def certifier_class(kind: str) -> type[Certifier]:
    """The Certifier class for a defense kind, e.g. ``"bagcert"``."""
    if kind in _CLASSES:
        return _CLASSES[kind]
    if kind not in _KINDS:
        raise DefenseError(f"unknown defense kind {kind!r}; known kinds: {', '.join(known_kinds())}")
    module, name = _KINDS[kind].split(":")
    try:
        cls = getattr(import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise DefenseError(f"defense {kind!r} is not available in this install ({e})") from e
    _CLASSES[kind] = cls
    return cls
