"""No unsafe deserialization or code evaluation anywhere in the installed package.

Every ``.py`` file of the installed ``certinfer`` (runtime, train, export, bench) is parsed and its calls are
checked, with import aliases resolved (``import pickle as p``, ``from numpy import load``):
``pickle``/``dill``/``cloudpickle``/``joblib``/``marshal``/``shelve`` loads, ``yaml.load`` (and its unsafe
variants), ``pandas.read_pickle``, any call with ``allow_pickle=True``, ``torch.load`` without
``weights_only=True``, ``numpy.load`` without ``allow_pickle=False``, and the builtins ``eval``/``exec``.
A failure names each file and line.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SUBPACKAGES = ("runtime", "train", "export", "bench")

BANNED = {
    **{f"{m}.{f}": "unpickles its input" for m in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
       for f in ("load", "loads", "Unpickler")},
    "joblib.load": "unpickles its input", "pandas.read_pickle": "unpickles its input",
    "numpy.lib.format.read_array": "may unpickle its input",
    "marshal.load": "loads code objects", "marshal.loads": "loads code objects",
    "shelve.open": "unpickles its values",
    "yaml.load": "can build arbitrary objects (use yaml.safe_load)",
    "yaml.unsafe_load": "builds arbitrary objects", "yaml.full_load": "builds arbitrary objects",
    "torch.jit.load": "loads a TorchScript archive (pickled code)",
    "eval": "evaluates code", "exec": "executes code",
}
# calls allowed only with a keyword set to a constant
REQUIRED = {"torch.load": ("weights_only", True), "numpy.load": ("allow_pickle", False)}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, from the module's imports (anywhere in it)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None
    return ".".join([aliases.get(func.id, func.id), *reversed(parts)])


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<not a constant>"
    return None


def unsafe_calls(source: str, filename: str) -> list[str]:
    """``file:line: call -- why`` for every unsafe call in ``source``."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    shadowed = set()  # names bound in the module: a function called eval is not the builtin
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            shadowed.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            shadowed.add(n.name)
        elif isinstance(n, ast.arg):
            shadowed.add(n.arg)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func, aliases)
        why = None
        if name in ("eval", "exec") and name in shadowed | set(aliases):
            name = None  # a local function of that name, not the builtin
        if name in BANNED:
            why = BANNED[name]
        elif name in REQUIRED:
            key, value = REQUIRED[name]
            got = _kw(node, key)
            if got is not value:
                why = f"needs {key}={value}" + ("" if got is None else f" (has {key}={got})")
        elif _kw(node, "allow_pickle") is True:
            why = "allow_pickle=True unpickles its input"
        if why:
            found.append(f"{filename}:{node.lineno}: {name}(...) -- {why}")
    return found


def package_sources() -> list[Path]:
    """Every source file of the installed package (its subpackages may live in other folders: runtime/, bench/)."""
    roots = {Path(p).resolve() for name in ("certinfer", *(f"certinfer.{s}" for s in SUBPACKAGES))
             for p in importlib.import_module(name).__path__}
    return sorted({f for root in roots for f in root.rglob("*.py") if ".venv" not in f.parts})


def test_the_installed_package_has_no_unsafe_loads():
    files = package_sources()
    assert {"runtime", "bench"} <= {p.parent.name for p in files}, "the installed package's sources were not found"
    found = [hit for p in files for hit in unsafe_calls(p.read_text(encoding="utf-8"), str(p))]
    assert not found, "unsafe loads in the installed package:\n" + "\n".join(found)


BAD = '''\
import pickle
import pickle as pk
import numpy as np
import torch
import yaml
from joblib import load as jl
from numpy import load
pickle.loads(b"")
pk.load(f)
np.load("a.npz")
np.load("a.npz", allow_pickle=True)
load("a.npy", allow_pickle=flag)
torch.load("w.pt")
torch.load("w.pt", weights_only=False)
yaml.load(text)
jl("m.joblib")
eval(data)
exec(code)
np.fromfile("x", dtype=np.uint8).view(np.int8)
'''

GOOD = '''\
import numpy as np
import torch
import yaml
np.load("a.npz", allow_pickle=False)
torch.load("w.pt", weights_only=True, map_location="cpu")
yaml.safe_load(text)
model.eval()
json.loads(s)
'''


def test_the_checker_finds_each_kind_and_names_file_and_line():
    found = unsafe_calls(BAD, "bad.py")
    lines = [int(f.split(":")[1]) for f in found]
    assert lines == list(range(8, 19)), found
    assert found[0] == "bad.py:8: pickle.loads(...) -- unpickles its input"
    assert "needs weights_only=True (has weights_only=False)" in found[6]
    assert "needs allow_pickle=False (has allow_pickle=<not a constant>)" in found[4]
    assert unsafe_calls(GOOD, "good.py") == []


@pytest.mark.parametrize("source", ["def eval(x):\n    return x\neval(1)\n", "from mylib import exec\nexec(1)\n"])
def test_local_functions_named_eval_are_not_the_builtin(source: str):
    assert unsafe_calls(source, "x.py") == []
