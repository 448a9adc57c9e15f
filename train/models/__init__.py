"""Model builder for the torch backend: ``build(config)`` rebuilds exactly the module a bundle's ONNX was
exported from, so a ``format: "torch"`` engine entry (a safetensors state dict) runs the same graph in torch.

``config`` (the engine entry's ``config``, JSON): ``module`` names the exported module, ``num_classes`` and
``model`` (the network's config as trained) rebuild it, ``input_shape`` is the engine's per-sample input shape.
Each defense builds its own modules: ``train/models/NAME.py`` (the registry's ``builder``) has ``build(config)``
and ``MODULES``, the names it builds. A module name starts with its defense's name (``ibp-bounds``); the older
names that do not are in :data:`OLDER_NAMES`.
"""

from __future__ import annotations

import json
from importlib import import_module

from torch import nn

from certinfer.runtime.defenses import REGISTRY, defense

OLDER_NAMES: dict[str, str] = {"bagnet-local-logits": "masking", "drs": "masking", "cropnet": "cropping"}


def _owner(module: object) -> str:
    """The defense that builds ``module``; ValueError for a name no defense builds."""
    name = OLDER_NAMES.get(module, module.partition("-")[0]) if isinstance(module, str) else ""
    entry = REGISTRY.get(name)
    try:
        builds = import_module(entry.builder.split(":")[0]).MODULES if entry is not None and entry.builder else ()
    except ImportError as err:
        raise ValueError(f"model config: module {module!r}: its defense's model code is not available ({err})")
    if module not in builds:
        raise ValueError(f"model config: module must be one of {known_modules()}, got {module!r}")
    return name


def known_modules() -> list[str]:
    """Every module name :func:`build` takes (from every defense whose model code is installed)."""
    names = []
    for entry in REGISTRY.values():
        try:
            names += import_module(entry.builder.split(":")[0]).MODULES if entry.builder else []
        except ImportError:
            continue
    return sorted(names)


def build(config: dict) -> nn.Module:
    """The module named by ``config["module"]``, in eval mode, with fresh weights (load the state dict next)."""
    name = _owner(config.get("module") if isinstance(config, dict) else None)
    return defense(name).load("builder")(config).eval()


def config(module: str, num_classes: int, model: dict, input_shape: tuple[int, ...], **extra) -> dict:
    """A JSON-ready ``config`` for :func:`build` (tuples become lists)."""
    _owner(module)
    return json.loads(json.dumps({"module": module, "num_classes": int(num_classes), "model": model,
                                  "input_shape": [int(v) for v in input_shape], **extra}))
