"""Bundles for the benchmarks: the packaged ones, and the runtime loader with a benchmark's engine options."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from certinfer.runtime.bundle import load_bundle
from certinfer.runtime.certifier import Certifier
from certinfer.runtime.defenses import DefenseError, defense
from certinfer.runtime.loader import certifier_for
from certinfer.runtime.packaged import data_dir as packaged, resolve
from certinfer.threat import Threat


def engine_options(kind: str, backend: str, threads: int | None = None) -> dict[str, Any]:
    """What a benchmark passes to the engine: a cap on onnxruntime's CPU threads, and for a torch backend the
    defense's model builder from the registry (and torch's thread cap)."""
    if not backend.startswith("torch"):  # native TensorRT takes no thread cap (auto passes none to it)
        return {"threads": threads} if threads and backend.startswith(("auto", "onnxruntime", "ort")) else {}
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        return {"builder": defense(kind).load("builder")}
    except DefenseError:  # no model code here (a runtime-only install): the torch engine says what is missing
        return {}


def load_certifier(bundle: str | os.PathLike | None, backend: str = "auto", threat: str | Threat | None = None,
                   threads: int | None = None, expect_sha256: str | None = None) -> Certifier:
    """The bundle's Certifier (None: the packaged default bundle), verified as the runtime loader does."""
    loaded = load_bundle(resolve(bundle),
                         expect_sha256=expect_sha256)
    options = engine_options(loaded.manifest["defense"]["kind"], backend, threads)
    return certifier_for(loaded, backend, threat, options)
