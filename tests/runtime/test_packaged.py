"""Bundles by name: ``default`` and the folders under certinfer/data/bundles; anything else is a path."""

from __future__ import annotations

from pathlib import Path

import pytest

import certinfer
from certinfer.runtime import packaged


def test_default_and_none_are_the_default_bundle() -> None:
    assert packaged.resolve(None) == packaged.resolve("default") == certinfer.default_bundle()
    assert certinfer.bundle_names()[0] == "default"


def test_every_packaged_name_loads_by_name() -> None:
    for name in certinfer.bundle_names():
        certifier = certinfer.load(name, backend="onnxruntime-cpu")
        assert certifier.manifest["defense"]["kind"]


def test_a_path_wins_over_a_name_and_an_unknown_name_lists_the_known(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert packaged.resolve("mine") == Path("mine")  # an existing folder is a path, not a name
    assert packaged.resolve("sub/bundle") == Path("sub/bundle")  # a path is passed on, checked by the loader
    with pytest.raises(FileNotFoundError, match="not a packaged bundle .*default"):
        packaged.resolve("no-such-bundle")


def test_the_default_bundle_loads_by_its_own_name_too():
    from certinfer.runtime import packaged

    assert packaged.resolve("bagcert-gtsrb") == packaged.resolve("default") == packaged.resolve(None)
