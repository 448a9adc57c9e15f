"""The defense registry: one entry per defense, read by the loader, the CLI, the benchmarks and the builders.

Each entry names where the defense's pieces live, as ``"module:attr"`` strings resolved on first use, so
the runtime never imports the trainer or the benchmarks (they sit above it) and loading one defense never
pulls the others. Adding a defense means writing its modules and adding one :class:`Defense` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from certinfer.runtime.certifier import Certifier


class DefenseError(ValueError):
    """A defense name this install does not know or cannot load."""


@dataclass(frozen=True)
class Defense:
    """Where one defense's pieces live (``"module:attr"``; empty where the defense has none).

    certifier: the runtime Certifier class (its ``Options`` class is ``Certifier.Options``).
    trainer / exporter: the typer apps behind ``certinfer train NAME`` and ``certinfer export NAME``.
    builder: ``build(config) -> torch module`` for a ``format: "torch"`` engine of this defense.
    reference: a plain, obviously correct re-implementation of the certification (bench/*_reference.py):
        ``reference(certifier, frames) -> list[Certificate]``.
    surrogate: the soundness attack's entry (``bench soundness NAME``).
    certify: the dataset evaluation's entry (``certinfer certify`` on a bundle of this defense).
    aliases: older names that bundles written before may carry.
    """

    name: str
    certifier: str
    trainer: str = ""
    exporter: str = ""
    builder: str = ""
    reference: str = ""
    surrogate: str = ""
    certify: str = ""
    aliases: tuple[str, ...] = ()

    def load(self, part: str) -> Any:
        """Import and return one of the entry's pieces (``"certifier"``, ``"trainer"`` ...)."""
        target = getattr(self, part)
        if not target:
            raise DefenseError(f"defense {self.name!r} has no {part}")
        module, attr = target.split(":")
        try:
            return getattr(import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise DefenseError(f"defense {self.name!r}: its {part} is not available in this install ({e})") from e


def _entry(name: str, certifier: str, *, model: bool = True, aliases: tuple[str, ...] = (), **extra: str) -> Defense:
    """The conventional layout: runtime/defenses/NAME.py, train/NAME.py, export/NAME.py, bench/NAME_reference.py."""
    return Defense(name=name, certifier=f"certinfer.runtime.defenses.{name}:{certifier}",
                   trainer=f"certinfer.train.{name}:cli", exporter=f"certinfer.export.{name}:cli",
                   builder=f"certinfer.train.models.{name}:build" if model else "",
                   reference=f"certinfer.bench.{name}_reference:reference",
                   surrogate=f"certinfer.bench.soundness:{name}_soundness",
                   certify=f"certinfer.bench.certify:{name}", aliases=aliases, **extra)


REGISTRY: dict[str, Defense] = {d.name: d for d in (
    _entry("bagcert", "BagCertCertifier"),
    _entry("masking", "MaskingCertifier", aliases=("patchguard",)),
    _entry("cropping", "CroppingCertifier"),
    _entry("ibp", "IBPCertifier"),
    _entry("scalecert", "ScaleCertCertifier"),
    _entry("doublemask", "DoubleMaskCertifier"),
)}
_EXTRA: dict[str, type[Certifier]] = {}  # certifiers registered at run time (tests, extensions)


def register(name: str, cls: type[Certifier]) -> None:
    """Make bundles of defense ``name`` load with ``cls`` (tests, extensions); replaces an earlier registration."""
    if not (isinstance(cls, type) and issubclass(cls, Certifier)):
        raise TypeError(f"defense {name!r}: {cls!r} is not a Certifier subclass")
    _EXTRA[name] = cls


def canonical(name: str) -> str:
    """The registry name for ``name`` or one of its aliases (``patchguard`` -> ``masking``)."""
    for d in REGISTRY.values():
        if name == d.name or name in d.aliases:
            return d.name
    return name


def defense(name: str) -> Defense:
    """The registry entry of a defense (by name or alias)."""
    entry = REGISTRY.get(canonical(name))
    if entry is None:
        raise DefenseError(f"unknown defense {name!r}; known defenses: {', '.join(known_kinds())}")
    return entry


def known_kinds() -> tuple[str, ...]:
    return tuple(sorted({*REGISTRY, *_EXTRA}))


def certifier_class(name: str) -> type[Certifier]:
    """The Certifier class for a bundle's ``defense.kind`` (a registry name or an alias)."""
    if name in _EXTRA:
        return _EXTRA[name]
    return defense(name).load("certifier")
