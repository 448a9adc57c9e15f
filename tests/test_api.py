"""The public Python API: certinfer.load, the defense registry, the packaged data paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import certinfer
from certinfer.runtime.certifier import Certifier, Options
from certinfer.runtime.frames import FrameError
from certinfer.runtime.defenses import DefenseError, canonical, certifier_class, defense, register
from certinfer.threat import ThreatError, parse


def test_load_uses_the_bundles_threat_or_the_given_one(tiny_bundle: Path):
    assert str(certinfer.load(tiny_bundle).threat) == "3x3"
    assert certinfer.load(str(tiny_bundle), threat="2x2,area:4").threat.keys == ("2x2", "1x4", "4x1")
    assert str(certinfer.load(tiny_bundle, threat=parse("5x5")).threat) == "5x5"
    with pytest.raises(ThreatError, match="larger than the 16x16 input"):
        certinfer.load(tiny_bundle, threat="17x1")


def test_certifier_api_verdicts(certifier: Certifier):
    frames = np.random.default_rng(2).integers(0, 256, (3, 40, 30, 3), dtype=np.uint8)
    verdicts = certifier(frames)
    assert len(verdicts) == 3 and all(isinstance(v, certinfer.Verdict) for v in verdicts)
    assert {v.status for v in verdicts} == {"uncertified"} and verdicts[0].backend == "onnxruntime-cpu"
    with pytest.raises(FrameError, match="NaN"):
        certifier(np.full((4, 4, 3), np.nan, np.float32))


def test_registry_lazy_known_and_unknown_kinds():
    with pytest.raises(DefenseError, match=r"unknown defense 'nope'; known defenses: .*bagcert.*test-argmax"):
        certifier_class("nope")
    with pytest.raises(TypeError):
        register("bad", dict)
    assert certifier_class("test-argmax").__name__ == "ArgmaxCertifier"
    assert canonical("patchguard") == "masking" and certifier_class("patchguard") is certifier_class("masking")
    for name in ("bagcert", "masking", "cropping", "ibp", "scalecert"):
        cls = defense(name).load("certifier")
        assert cls.name == name and issubclass(cls.Options, Options)


def test_packaged_data_or_a_clear_error():
    for get in (certinfer.default_bundle, certinfer.sample_frames):
        try:
            path = get()
        except FileNotFoundError as e:
            assert "with the BagCert model" in str(e)
        else:
            assert path.is_dir() and any(path.iterdir())


def test_load_gives_torch_backends_the_trainers_model_builder(monkeypatch, tiny_bundle: Path):
    pytest.importorskip("torch")
    from certinfer.runtime import loader
    from certinfer.train.models import build

    seen = []
    monkeypatch.setattr(loader, "load", lambda *args, **kw: seen.append(kw["engine_options"]))
    mine = object()
    certinfer.load(tiny_bundle, backend="torch-cpu", engine_options={"threads": 1})
    certinfer.load(tiny_bundle, backend="onnxruntime-cpu")
    certinfer.load(tiny_bundle, backend="torch", engine_options={"builder": mine})
    assert seen == [{"threads": 1, "builder": build}, None, {"builder": mine}]
