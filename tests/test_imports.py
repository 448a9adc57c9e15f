"""Imports flow one way: certinfer (API, CLI) -> bench -> export -> train -> runtime; nothing imports the CLI.

Every ``import`` statement in the package counts, lazy ones inside functions included. ``certinfer.threat``
and ``certinfer.provenance`` are leaves that every layer may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"runtime": "certinfer.runtime", "train": "certinfer.train", "export": "certinfer.export",
           "bench": "certinfer.bench", "certinfer": "certinfer"}
RANK = {"certinfer.runtime": 0, "certinfer.train": 1, "certinfer.export": 2, "certinfer.bench": 3, "certinfer": 4}
LEAVES = ("certinfer.threat", "certinfer.provenance")


def layer(module: str) -> str | None:
    """The layer a certinfer module belongs to (None: a leaf, or not certinfer's)."""
    if module.startswith(LEAVES) or not (module == "certinfer" or module.startswith("certinfer.")):
        return None
    for name in ("certinfer.runtime", "certinfer.train", "certinfer.export", "certinfer.bench"):
        if module == name or module.startswith(name + "."):
            return name
    return "certinfer"


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file; ``from certinfer import x`` names ``certinfer.x``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module" \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value))  # a literal import_module("...") is an import too
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{a.name}" if node.module == "certinfer" else node.module)
                      for a in node.names]
    return found


def package_files() -> list[tuple[Path, str]]:
    return [(p, FOLDERS[folder]) for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]


def violations() -> list[str]:
    bad = []
    for path, own in package_files():
        rel = path.relative_to(ROOT)
        for line, module in imported(path):
            if module == "certinfer.cli" or module.startswith("certinfer.cli."):
                bad.append(f"{rel}:{line} imports the CLI")
                continue
            target = layer(module)
            if own == "certinfer" and path.name not in ("__init__.py", "cli.py", "annotate.py"):
                continue  # the leaves (threat, provenance) are checked by their own imports below
            if target is not None and RANK[target] > RANK[own]:
                bad.append(f"{rel}:{line} ({own}) imports {module} ({target}), which sits above it")
    return bad


def test_imports_flow_one_way() -> None:
    assert violations() == []


@pytest.mark.parametrize("leaf", ["threat.py", "provenance.py"])
def test_leaves_import_no_layer(leaf: str) -> None:
    mods = [m for _, m in imported(ROOT / "certinfer" / leaf)]
    assert [m for m in mods if layer(m) is not None] == []


def test_checker_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from certinfer.train.data import load\n    import certinfer.cli\n"
                   "    importlib.import_module('certinfer.bench.latency')\n")
    mods = sorted(m for _, m in imported(bad))
    assert mods == ["certinfer.bench.latency", "certinfer.cli", "certinfer.train.data"]
    assert [layer(m) for m in mods] == ["certinfer.bench", "certinfer", "certinfer.train"]
