"""The installed distribution: one certinfer namespace, a runtime without torch."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import PurePosixPath


def test_everything_installs_under_certinfer():
    tops = {PurePosixPath(str(f)).parts[0] for f in metadata.files("certinfer") or []}
    tops = {t for t in tops if t != ".." and not t.endswith(".dist-info")}
    assert tops == {"certinfer"}, f"top-level entries besides certinfer: {sorted(tops - {'certinfer'})}"


def test_torch_is_only_an_extra():
    for req in metadata.requires("certinfer") or []:
        if req.lower().startswith("torch"):
            assert "extra ==" in req and "train" in req, req


def test_runtime_imports_from_anywhere_without_torch(tmp_path):
    code = ("import sys, importlib.util as u\n"
            "import certinfer.runtime, certinfer.runtime.defenses.bagcert, certinfer.runtime.engines\n"
            "assert all(u.find_spec(m) is None for m in ('runtime', 'train', 'export', 'bench')), 'top-level module'\n"
            "assert 'torch' not in sys.modules, 'the runtime imported torch'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=60)


def test_train_and_export_use_no_private_names_of_other_modules():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    private = []
    for path in sorted([*(root / "train").rglob("*.py"), *(root / "export").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("certinfer"):
                private += [f"{path.relative_to(root)}:{node.lineno} {node.module}.{a.name}"
                            for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert private == []
