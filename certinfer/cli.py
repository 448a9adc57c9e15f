"""The ``certinfer`` command line.

``run`` and ``inspect`` work against any bundle. ``train NAME`` and ``export NAME`` run a defense's trainer and
exporter, found in the defense registry (:data:`certinfer.runtime.defenses.REGISTRY`), e.g.
``certinfer train bagcert --preset gtsrb-cpu``; ``export`` also holds tools for any bundle (:data:`EXPORT_TOOLS`),
``bench`` the benchmarks (:data:`BENCH`). ``certify`` is one command for every bundle: its defense's dataset
evaluation comes from the registry. Modules are imported only when their command runs, so ``certinfer run``
never imports torch; on an install without torch, ``--help`` of a command that needs it shows the command's
summary (read from its source) and what to install. Errors are one line on stderr unless ``--debug``.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Iterator, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from certinfer.runtime.defenses import REGISTRY, canonical

# Subcommands that are no defense's: name -> "module:attr" (a typer.Typer with one command, or a click command).
EXPORT_TOOLS: dict[str, str] = {"trt": "certinfer.export.tensorrt_build:cli", "parity": "certinfer.export.parity:cli",
                                "torch": "certinfer.export.torch_weights:cli"}
BENCH: dict[str, str] = {"latency": "certinfer.bench.latency:cli", "summary": "certinfer.bench.summary:cli",
                         "soak": "certinfer.bench.soak:cli", "soundness": "certinfer.bench.soundness:cli",
                         "doublemask-speed": "certinfer.bench.doublemask_speed:cli",
                         "doublemask-tradeoff": "certinfer.bench.doublemask_tradeoff:cli",
                         "cascade": "certinfer.bench.cascade:cli",
                         "background": "certinfer.bench.background:cli",
                         "testset": "certinfer.bench.testset:cli"}

_state = {"debug": False}


class CLIError(Exception):
    """An error whose message is meant for the user as it is."""


def _import(target: str):
    module, attr = target.split(":")
    return getattr(import_module(module), attr)


def _stub(name: str, message: str, summary: str = "") -> TyperCommand:
    """A stand-in command that takes any arguments and fails with ``message``; with a ``summary``, its ``--help``
    prints the summary and the message instead."""
    stub = typer.Typer(add_completion=False, rich_markup_mode=None)
    help_text = f"{summary}\n\n{message} (its options are listed once it is installed)" if summary else None

    @stub.command(name, help=help_text, add_help_option=bool(summary),
                  context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def fail(args: Optional[list[str]] = typer.Argument(None, hidden=True)) -> None:
        raise CLIError(message)

    return typer.main.get_command(stub)


def _is_command_of(decorator: ast.expr, app: str) -> bool:
    return (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "command" and isinstance(decorator.func.value, ast.Name)
            and decorator.func.value.id == app)


def _sentences(call: ast.Call) -> list[str]:
    values = [*call.args, *(k.value for k in call.keywords)]
    return [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str) and " " in v.value]


def _helps(tree: ast.Module, app: str) -> Iterator[str]:
    """Where a command's help is written, best first: the docstring of a function decorated ``@app.command(...)``,
    a sentence given to the call that makes ``app`` (``cli = trainer_cli(..., "Train ...")``), the module's
    docstring."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(_is_command_of(d, app) for d in node.decorator_list):
            yield ast.get_docstring(node) or ""
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                any(isinstance(t, ast.Name) and t.id == app for t in node.targets):
            yield from _sentences(node.value)
    yield ast.get_docstring(tree) or ""


def _summary(target: str) -> str:
    """The first paragraph of the help of ``module:app``'s command, read from the source without running it (so
    without the packages it imports); empty where the source cannot be found."""
    module, app = target.split(":")
    try:
        spec = find_spec(module)
    except ImportError:
        return ""
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return ""
    helps = _helps(ast.parse(Path(spec.origin).read_text(encoding="utf-8")), app)
    return next(filter(None, helps), "").split("\n\n")[0].replace("``", "")


def _plain(command: TyperCommand | TyperGroup) -> TyperCommand | TyperGroup:
    """The command (and its subcommands) with help texts printed as written: rich markup would drop the
    ``[default: ...]`` notes of option help."""
    command.rich_markup_mode = None
    for sub in getattr(command, "commands", {}).values():
        _plain(sub)
    return command


def _defense_commands(part: str) -> Callable[[], dict[str, str]]:
    """The registry's defenses that have ``part`` (``trainer``, ``exporter``), as subcommand -> target."""
    return lambda: {name: getattr(d, part) for name, d in REGISTRY.items() if getattr(d, part)}


def _missing(group: str, name: str, e: ImportError) -> str:
    missing = e.name or str(e)
    if missing == "certinfer" or missing.startswith("certinfer."):
        return f"{group} {name}: {e}"
    return f'{group} {name} needs {missing}: pip install ".[train]"'


def _plugin_group(commands: Callable[[], dict[str, str]], what: str) -> type[TyperGroup]:
    """A typer group whose subcommands are ``commands()`` (name -> "module:attr"), imported lazily; a defense's
    older name (``patchguard``) finds its registry name's command."""

    class PluginGroup(TyperGroup):
        def list_commands(self, ctx: typer.Context) -> list[str]:
            return [*super().list_commands(ctx), *sorted(commands())]

        def get_command(self, ctx: typer.Context, name: str):
            group, known = self.name or "", commands()
            target = known.get(name) or known.get(canonical(name))
            if target is None:
                return super().get_command(ctx, name) or _stub(
                    name, f"{group}: no {what} {name!r} (available: {', '.join(sorted(known)) or 'none'})")
            try:
                command = _import(target)
            except ImportError as e:  # e.g. torch on a runtime-only install
                return _stub(name, _missing(group, name, e), _summary(target))
            return _plain(typer.main.get_command(command) if isinstance(command, typer.Typer) else command)

    return PluginGroup


app = typer.Typer(name="certinfer", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # help texts as written: rich markup would drop their "[default: ...]"
                  help="Certified patch defenses: certify every frame, train, export, benchmark.")
train_app = typer.Typer(cls=_plugin_group(_defense_commands("trainer"), "defense"), no_args_is_help=True,
                        rich_markup_mode=None, help="Train a defense: certinfer train DEFENSE ...")
export_app = typer.Typer(cls=_plugin_group(lambda: {**_defense_commands("exporter")(), **EXPORT_TOOLS},
                                           "defense or tool"), no_args_is_help=True, rich_markup_mode=None,
                         help="Export a trained defense to a bundle: certinfer export DEFENSE CHECKPOINT OUT ...; "
                              "add a TensorRT plan to any bundle: certinfer export trt BUNDLE; a torch engine: "
                              "certinfer export torch BUNDLE CHECKPOINT")
bench_app = typer.Typer(cls=_plugin_group(lambda: BENCH, "benchmark"), no_args_is_help=True,
                        rich_markup_mode=None, help="Latency and accuracy benchmarks.")
app.add_typer(train_app, name="train")
app.add_typer(export_app, name="export")
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        from certinfer import __version__
        typer.echo(f"certinfer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
) -> None:
    _state["debug"] = debug


@contextmanager
def _lines_out(path: Path | None) -> Iterator:
    if path is None:
        yield sys.stdout
    else:
        with open(path, "w", encoding="utf-8") as f:
            yield f


@app.command()
def run(
    source: Optional[str] = typer.Argument(
        None, help="Image file, folder, video file, camera index or stream URL [default: the packaged sample frames]"),
    bundle: Optional[list[str]] = typer.Option(
        None, "--bundle", "-b", help="Bundle folder or .tar, or a packaged bundle's name [default: default]; "
                                     "give it several times for a cascade, tried in that order"),
    backend: str = typer.Option(
        "auto", help="auto, onnxruntime-cpu, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt, torch"),
    threat: Optional[str] = typer.Option(
        None, help="Threat spec, e.g. 5x5, 2.4%, or 24x24@camera in camera pixels [default: the bundle's]"),
    rois: Optional[Path] = typer.Option(
        None, "--rois", help="A detector's boxes, JSON lines (ROS 2 Detection2D fields): one verdict per box"),
    deadline_ms: Optional[float] = typer.Option(
        None, "--deadline-ms", help="Per-frame deadline; late frames are fail-safe, a cascade skips stages "
                                    "that cannot finish within it"),
    batch: int = typer.Option(1, min=1, help="Frames per engine call"),
    out: Optional[Path] = typer.Option(None, help="Write the JSON lines here instead of stdout"),
    annotate: Optional[Path] = typer.Option(
        None, help="Write each frame with its label and status to this folder, in the status colour: green "
                   "certified, amber uncertified, orange alert, red fail-safe"),
    strict: bool = typer.Option(False, "--strict", help="Exit with status 3 when any verdict is fail-safe"),
    bundle_sha256: Optional[str] = typer.Option(
        None, "--bundle-sha256", help="Refuse any bundle but the one with this digest (certinfer inspect prints it)"),
) -> None:
    """Certify every frame of SOURCE (or each detector box): one JSON verdict per line, a summary line on stderr."""
    import certinfer
    from certinfer.runtime.stream import StreamSummary, open_source, run_stream

    if deadline_ms is not None and deadline_ms < 0:
        raise CLIError(f"--deadline-ms must be >= 0, got {deadline_ms:g}")
    _check_outputs(out, annotate)
    boxes = _read_rois(rois)
    bundles = bundle or [None]
    cascade = {"deadline_ms": deadline_ms} if len(bundles) > 1 else {}
    certifier = certinfer.load(bundles if len(bundles) > 1 else bundles[0], backend=backend, threat=threat,
                               expect_sha256=bundle_sha256, **cascade)
    frames = open_source(source if source is not None else certinfer.sample_frames())
    annotator = None
    if annotate is not None:
        from certinfer.annotate import Annotator
        annotator = Annotator(annotate)
        frames = annotator.watch(frames)
    summary = StreamSummary(truth=_sample_truth(certifier.classes) if source is None else None)
    with _lines_out(out) as f:
        try:
            _write(run_stream(certifier, frames, deadline_ms=deadline_ms, batch=batch, summary=summary, rois=boxes),
                   f, annotator)
        finally:
            typer.echo(f"certinfer: {summary}", err=True)
    if strict and summary.statuses["fail-safe"]:
        raise typer.Exit(3)


def _check_outputs(out: Path | None, annotate: Path | None) -> None:
    """Refuse, before anything runs, an --out file or --annotate folder that cannot be written."""
    if out is not None:
        if out.is_dir():
            raise CLIError(f"--out {out} is a folder: give a file name")
        if not out.parent.is_dir():
            raise CLIError(f"--out {out}: no folder {out.parent}")
        if not os.access(out if out.exists() else out.parent, os.W_OK):
            raise CLIError(f"--out {out}: not writable")
    if annotate is not None and annotate.exists() and not annotate.is_dir():
        raise CLIError(f"--annotate {annotate} is a file: give a folder")


def _sample_truth(classes: list[str]) -> dict[str, int] | None:
    """The packaged sample frames' true labels (file name -> class), where the bundle's classes begin with theirs."""
    import certinfer

    labels = json.loads((certinfer.sample_frames() / "labels.json").read_text(encoding="utf-8"))
    return labels["frames"] if list(classes)[:len(labels["classes"])] == labels["classes"] else None


def _read_rois(path: Path | None):
    if path is None:
        return None
    from certinfer.runtime.detections import read
    return read(path)


def _write(verdicts: Iterator, f, annotator) -> None:
    """Each verdict written as it comes (a live source's consumer gets it at once); a frame is annotated when
    its last verdict is out."""
    held: list = []
    for verdict in verdicts:
        f.write(verdict.to_json() + "\n")
        f.flush()
        if annotator is not None and held and verdict.frame != held[-1].frame:
            annotator.write(held)
            held = []
        held.append(verdict)
    if annotator is not None:
        if held:
            annotator.write(held)
        annotator.close()


@app.command()
def bundles(
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list of objects instead of a table"),
    measure: bool = typer.Option(False, "--measure", help="Also time each bundle on one frame here (batch 1, p50)"),
) -> None:
    """The bundles shipped in the package: defense, certificate kind, threat, accuracy, size, training command."""
    import json

    from certinfer.catalog import catalog, table

    rows = catalog(measure)
    typer.echo(json.dumps(rows, indent=2) if json_out else table(rows))


def _fmt_pair(v: list) -> str:
    return f"{v[0]}x{v[1]}"


def _manifest_lines(path: Path, m: dict) -> list[str]:
    inp = m["input"]
    lines = [f"bundle      {path}", f"schema      {m['schema']}",
             f"defense     {m['defense']['kind']} {m['defense']['params']}",
             f"input       {_fmt_pair(inp['hw'])}x{inp['channels']}, {len(inp['classes'])} classes, "
             f"mean {inp['mean']}, std {inp['std']}, resize {inp.get('resize', 'bilinear')}",
             f"threat      {m['threat']}"]
    if g := m.get("geometry"):
        lines.append(f"geometry    rf {_fmt_pair(g['rf'])}, stride {_fmt_pair(g['stride'])}, padding "
                     f"{_fmt_pair(g['padding'])}, {_fmt_pair(g['input_hw'])} -> {_fmt_pair(g['output_hw'])}")
    for e in m["engines"]:
        batch = f", batch {e['batch'][0]}-{e['batch'][1]}" if "batch" in e else ""
        lines.append(f"engine      {e['file']}: {e['format']} {e['precision']}, role {e.get('role', 'model')}"
                     f"{batch}, sha256 {e['sha256'][:16]}...")
    prov = {k: v for k, v in m.get("provenance", {}).items() if isinstance(v, (str, int, float, bool))}
    if prov:
        lines.append("provenance  " + ", ".join(f"{k}={v}" for k, v in prov.items()))
    return lines


@app.command()
def inspect(bundle: Path = typer.Argument(..., help="Bundle folder or .tar, or a packaged bundle's name"),
            probe: bool = typer.Option(False, "--probe", help="Re-check the receptive field and batch independence "
                                                              "on every backend here"),
            trials: int = typer.Option(64, min=1, help="Random patches per backend and check, with --probe"),
            bundle_sha256: Optional[str] = typer.Option(
                None, "--bundle-sha256", help="Refuse any bundle but the one with this digest"),
            ) -> None:
    """Print a bundle's manifest, verify its seal and every file's sha256 (and, with --probe, its geometry)."""
    from certinfer.runtime.bundle import DIGEST_KEY, load_bundle
    from certinfer.runtime.packaged import resolve

    bundle = resolve(bundle)

    loaded = load_bundle(bundle, expect_sha256=bundle_sha256)  # raises on any bad manifest, seal, pin or hash
    for line in _manifest_lines(bundle, loaded.manifest):
        typer.echo(line)
    seal = "manifest sealed" if DIGEST_KEY in loaded.manifest else "manifest NOT sealed: edits go unnoticed"
    typer.echo(f"digest      {loaded.digest} ({seal}{', matches the pin' if bundle_sha256 else ''})")
    typer.echo("verified    all engine files match their sha256")
    if probe:
        _inspect_probe(loaded, trials)


def _probe_line(backend: str, r: dict) -> str:
    if r["status"] == "skipped":
        return f"probe       {backend}: skipped ({r['reason']})"
    if r["status"] == "failed" and not r["listed_exact"]:
        return (f"probe       {backend}: not bit-exact ({r['error']}); not in probe.exact_backends, so the "
                f"runtime does not trust it for certificates that need locality")
    if r["status"] == "failed":
        return f"probe       {backend}: FAILED: {r['error']}"
    checks = ", ".join(f"{name}{' (' + c['op'] + ' input)' if 'op' in c else ''}: {c['trials']} random patches"
                       if "trials" in c else f"{name} not checked: {c['skipped']}" for name, c in r["checks"].items())
    note = "" if r["listed_exact"] else "; not in probe.exact_backends: the runtime still treats it as unverified"
    local = "outside affected() bit-identical, " if any("trials" in c for c in r["checks"].values()) else ""
    # the pre-activation view is the sensitive one: where it could not run, the probe is only partial
    state = "partial" if "skipped" in r["checks"].get("preactivation", {}) else "passed"
    atol = max((b.get("atol", 0.0) for b in r.get("batch", {}).values()), default=0.0)
    within = f" within {atol:g}" if atol else ""
    return f"probe       {backend}: {state} ({checks}): {local}batch-invariant{within}{note}"


def _inspect_probe(loaded, trials: int) -> None:
    """The receptive-field probe on every backend that can run the bundle here.

    Exit 1 if a backend the manifest lists as bit-exact fails, or none ran. A failure on an unlisted backend
    is reported but expected: the certifiers already distrust it (e.g. torch-cpu, whose kernels can depend
    on the batch).
    """
    reports = _import("certinfer.export.probe:probe_bundle")(loaded, trials=trials)
    for backend, r in reports.items():
        typer.echo(_probe_line(backend, r))
    failed = {b: r["error"] for b, r in reports.items() if r["status"] == "failed" and r["listed_exact"]}
    if failed:
        raise CLIError("probe failed on " + "; ".join(f"{b}: {e}" for b, e in failed.items()))
    if not any(r["status"] == "passed" for r in reports.values()):
        raise CLIError("probe could not run on any backend here: "
                       + "; ".join(f"{b}: {r.get('reason') or r['error']}" for b, r in reports.items()))


def _param(values: list[str]) -> dict[str, str]:
    params = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{v!r} is not KEY=VALUE", param_hint="--param")
        params[key] = value
    return params


@app.command()
def certify(
    bundle: Optional[Path] = typer.Argument(None, help="Bundle folder or .tar, or a packaged bundle's name"),
    data: Optional[str] = typer.Option(None, help="Dataset split, e.g. gtsrb:test, cifar10:test, folder:PATH"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir",
        help="Data folder with gtsrb/ and cifar10/ [default: $CERTINFER_DATA, else shared/data here or above]"),
    threat: Optional[str] = typer.Option(None, help="Threat spec(s), e.g. 5x5,2.4% [default: the bundle's]"),
    backend: str = typer.Option("auto", help="Engine backend"),
    batch: int = typer.Option(64, min=1, help="Frames per engine call"),
    limit: Optional[int] = typer.Option(None, min=1, help="Certify only the first N samples"),
    shard: str = typer.Option("0/1", help="Certify shard i of n (i/n), for fanning out"),
    merge: list[Path] = typer.Option([], "--merge", help="Combine these shard results instead (repeatable)"),
    out: Optional[Path] = typer.Option(None, help="Write the results as JSON here"),
    plot: Optional[Path] = typer.Option(None, help="Write a plot of the results here"),
    param: list[str] = typer.Option([], "--param", "-p", help="Defense option KEY=VALUE (repeatable)"),
    bundle_sha256: Optional[str] = typer.Option(
        None, "--bundle-sha256", help="Refuse any bundle but the one with this digest (certinfer inspect prints it)"),
) -> None:
    """Certified accuracy of a bundle on a dataset against threats (or --merge shard results)."""
    from certinfer.bench.certify import Job, merge_files

    if merge:
        merge_files(merge, out, plot)
        return
    if bundle is None or data is None:
        raise CLIError("certify needs a BUNDLE and --data (or --merge shard results)")
    from certinfer.runtime.bundle import load_bundle
    from certinfer.runtime.packaged import resolve

    bundle = resolve(bundle)
    verified = load_bundle(bundle, expect_sha256=bundle_sha256)
    kind = verified.manifest["defense"]["kind"]
    entry = REGISTRY.get(canonical(kind))
    if entry is None or not entry.certify:
        available = ", ".join(sorted(n for n, d in REGISTRY.items() if d.certify))
        raise CLIError(f"certify: no dataset evaluation for defense {kind!r} (available: {available})")
    job = Job(bundle=bundle, data=data, threat=threat, backend=backend, batch=batch, limit=limit, shard=shard,
              params=_param(param), sha256=verified.digest, data_dir=data_dir)
    entry.load("certify")(job, out, plot)


def _one_line(e: BaseException) -> str:
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, (CLIError, ValueError, OSError)) and msg:  # our own errors (BundleError, ThreatError...), I/O
        return msg
    return f"{type(e).__name__}: {msg} (run with --debug for the traceback)" if msg else type(e).__name__


def _error(msg: str) -> None:
    sys.stderr.write(f"certinfer: error: {msg}\n")


def _report(e: Exception) -> int:
    """Print an exception as one line (a traceback first with --debug); the exit code."""
    if _state["debug"]:
        traceback.print_exc()
    # typer's usage errors (click's, vendored or not) carry their own message and exit code (2)
    if type(e).__name__ == "NoArgsIsHelpError":
        if msg := e.format_message().strip():  # rich help is printed already, plain help is the message
            typer.echo(msg)
        return e.exit_code
    if hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int):
        _error(" ".join(e.format_message().split()))
        return e.exit_code
    _error(_one_line(e))
    return 1


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app; every error becomes one line on stderr and exit code 1 (usage: 2)."""
    _state["debug"] = False
    try:
        code = app(args=argv, prog_name="certinfer", standalone_mode=False)
        code = code if isinstance(code, int) else 0
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _error("aborted")
        code = 130
    except BrokenPipeError:  # e.g. `certinfer run | head`: stop quietly, like other unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except Exception as e:
        code = _report(e)
    sys.exit(code)
