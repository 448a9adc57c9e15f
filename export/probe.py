"""Receptive-field probe: perturb random patches of the real engine and check locality bit for bit.

A certificate over ``Geometry.affected`` is only as good as the claim that a patch changes nothing
else, on the backend that computes it. The probe runs the engine's output (N, H', W', C) (pre-threshold
where it can) on an image and on copies with a random patch, and requires every output outside
``affected()`` to be bit-identical. It also checks that a frame's outputs do not depend on the batch it
ran in (an attacker's frame may run alone, and ScaleCert's proof compares a frame's outputs across its two
passes): :func:`batch_probe` runs the engine inputs the defense itself makes at every batch size the runtime
can use, up to the engine's largest. :func:`probe_bundle` runs both on every backend here that can run a
bundle's engines (batch independence alone where the bundle has no geometry: nothing local to probe).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from certinfer.export import ExportError
from certinfer.export.parity import Recording, certifier_with, engine_options, roles
from certinfer.runtime.bundle import Bundle, load_bundle
from certinfer.runtime.engines import EngineError, engine_entry, load_engine
from certinfer.runtime.geometry import Geometry
from certinfer.threat import parse


def expose_input_of(onnx_bytes: bytes, op_type: str, name: str = "preactivation") -> bytes:
    """The same graph with the first input of its (single) ``op_type`` node added as an output ``name``.

    The probe reads the real engine's pre-threshold values through this output (needs the ``onnx`` package).
    """
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    if len(nodes) != 1:
        raise ValueError(f"expected one {op_type} node in the graph, found {len(nodes)}")
    model.graph.node.append(onnx.helper.make_node("Identity", [nodes[0].input[0]], [name]))
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


class ProbeError(AssertionError):
    """The engine's outputs change outside the manifest geometry's affected ranges."""


def _outside_mask(geometry: Geometry, rect: tuple[int, int], loc: tuple[int, int]) -> np.ndarray:
    (r0, r1), (c0, c1) = geometry.affected(rect, loc)
    mask = np.ones(geometry.output_hw, dtype=bool)
    mask[r0:r1, c0:c1] = False
    return mask


def bits(a: np.ndarray) -> np.ndarray:
    """An output's values as float32 bit patterns (exact comparison, NaNs and signed zeros included)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def probe(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, geometry: Geometry,
          rects: list[tuple[int, int]], trials: int = 64, batch: int = 8, seed: int = 0,
          batch_invariance: bool = True) -> dict:
    """Probe ``run`` (NCHW float32 -> (N, H', W', C) float32) with ``trials`` random patches.

    Raises :class:`ProbeError` on the first output outside ``affected()`` that changed; returns a report.
    """
    rng = np.random.default_rng(seed)
    h, w = geometry.input_hw
    changed_inside, checked = 0, 0
    lo, hi = float(images.min()), float(images.max())
    for t in range(0, trials, batch):
        k = min(batch, trials - t)
        base = images[rng.integers(len(images))]
        patched, masks = [], []
        for _ in range(k):
            rh, rw = rects[rng.integers(len(rects))]
            top, left = int(rng.integers(h - rh + 1)), int(rng.integers(w - rw + 1))
            x = base.copy()
            x[:, top:top + rh, left:left + rw] = rng.uniform(lo, hi, size=(x.shape[0], rh, rw))
            patched.append(x)
            masks.append(_outside_mask(geometry, (rh, rw), (top, left)))
        out = run(np.stack([base] + patched).astype(np.float32))
        ref = bits(out[0])
        if batch_invariance and not np.array_equal(ref, bits(run(base[None].astype(np.float32))[0])):
            raise ProbeError("engine outputs depend on the batch a frame runs in: not bit-exact")
        for i, mask in enumerate(masks):
            diff = (bits(out[i + 1]) != ref).any(axis=-1)
            if (diff & mask).any():
                r, c = np.argwhere(diff & mask)[0]
                raise ProbeError(f"output cell ({r}, {c}) changed although it lies outside the affected range "
                                 f"of a patch: the real receptive field exceeds the manifest geometry")
            changed_inside += int(diff.any())
            checked += 1
    return {"trials": checked, "rects": [list(r) for r in rects], "bit_exact": True,
            "batch_invariant": batch_invariance,
            "patches_that_changed_outputs": changed_inside}


def _as_tuple(out) -> tuple[np.ndarray, ...]:
    return out if isinstance(out, tuple) else (out,)


def _row(outputs, i: int) -> list[np.ndarray]:
    return [bits(o[i]) for o in _as_tuple(outputs)]


def _rows_equal(a, i: int, b, j: int, atol: float = 0.0) -> bool:
    """Row ``i`` of outputs ``a`` against row ``j`` of ``b``: the same bits, or (``atol`` > 0) every value within
    ``atol`` (NaN never is)."""
    if atol == 0.0:
        return all(np.array_equal(x, y) for x, y in zip(_row(a, i), _row(b, j)))
    return all(np.allclose(x[i], y[j], rtol=0.0, atol=atol) for x, y in zip(_as_tuple(a), _as_tuple(b)))


def batch_probe(run: Callable[[np.ndarray], np.ndarray | tuple], rows: np.ndarray, max_batch: int,
                alone: int = 8, sizes: Iterable[int] = (), atol: float = 0.0) -> dict:
    """Batch independence at the sizes the runtime uses: ``rows`` (engine inputs, repeated up to ``max_batch``)
    run in batches of 7, 64, every one of ``sizes`` and ``max_batch`` (those that fit) must give every row the
    same output bits (within ``atol``, for a defense whose certificates absorb that much rounding), and ``alone``
    rows spread over the batch must get them run alone too. Raises :class:`ProbeError` otherwise."""
    rows = np.resize(rows, (max_batch, *rows.shape[1:]))  # the rows repeated in order
    sizes = sorted({s for s in (7, 64, *sizes) if 1 < s < max_batch} | {max_batch})
    within = f" by more than {atol:g}" if atol else ""
    full = run(rows)
    for s in sizes[:-1]:
        part = run(rows[:s])
        if not all(_rows_equal(part, i, full, i, atol) for i in range(s)):
            raise ProbeError(f"engine outputs differ{within} between batches of {s} and {max_batch}: "
                             "not batch-independent")
    picks = np.unique(np.linspace(0, max_batch - 1, min(alone, max_batch)).astype(int))
    for i in picks:
        if not _rows_equal(run(rows[i:i + 1]), 0, full, i, atol):
            raise ProbeError(f"engine outputs of row {i} differ{within} between a batch of 1 and a batch of "
                             f"{max_batch}: not batch-independent")
    report = {"rows": int(max_batch), "batch_sizes": _ranges([1, *sizes]), "rows_alone": int(len(picks)),
              "batch_invariant": True}
    return {**report, "atol": atol} if atol else report


def export_batch_probe(session, rows: np.ndarray, max_batch: int, sizes: Iterable[int], what: str,
                       needs: str) -> dict:
    """:func:`batch_probe` of an onnxruntime CPU session's first output at export: a graph that fails is refused
    (:class:`ExportError` naming ``what`` and what the defense ``needs``)."""
    name = session.get_inputs()[0].name
    try:
        return batch_probe(lambda b: session.run(None, {name: b})[0], rows, max_batch, sizes=sizes)
    except ProbeError as e:
        raise ExportError(f"{what} on onnxruntime CPU: {e}; {needs}") from None


def _ranges(sizes: list[int]) -> list[int | str]:
    """Sorted sizes with runs of four or more written ``"a-b"``: the report stays short."""
    out: list[int | str] = []
    start = 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or sizes[i] != sizes[i - 1] + 1:
            run = sizes[start:i]
            out.extend([f"{run[0]}-{run[-1]}"] if len(run) >= 4 else run)
            start = i
    return out


ONNX_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt")
TORCH_BACKENDS = ("torch-cpu", "torch-cuda", "torch-cuda-graphs")


def candidate_backends(bundle: Bundle) -> list[str]:
    """Every backend that could run one of the bundle's engines, of any role (whether installed here or not)."""
    formats = {e["format"] for role in roles(bundle) for e in bundle.engines(role)}
    return [*(ONNX_BACKENDS if "onnx" in formats else ()), *(("tensorrt",) if "tensorrt" in formats else ()),
            *(TORCH_BACKENDS if "torch" in formats else ())]


def _preactivation_run(bundle: Bundle, backend: str, op: str, cache: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The ONNX engine with ``op``'s NCHW input exposed, on ``backend``'s provider: NCHW -> (N, H', W', C)."""
    import onnxruntime as ort

    from certinfer.runtime.engines.onnxruntime_engine import (PROVIDERS, input_spec, provider_options,
                                                              trt_cache_folder, trt_profile)

    kind = backend.removeprefix("onnxruntime-")
    entry = engine_entry(bundle, "onnx")
    model = expose_input_of(bundle.read(entry), op)
    # a cache folder of its own: the TensorRT provider builds an engine for this modified graph
    fp16 = entry["precision"] == "fp16"  # as the runtime's engine would run it
    profile = None
    if kind == "tensorrt":
        trt_cache_folder(entry, cache).mkdir(parents=True, exist_ok=True)
        profile = trt_profile(*input_spec(model), entry["batch"])
    session = ort.InferenceSession(model, providers=provider_options(kind, entry, 0, fp16, cache, profile))
    if session.get_providers()[0] != PROVIDERS[kind]:
        raise EngineError(f"the probe graph fell back from {PROVIDERS[kind]} to {session.get_providers()[0]}")
    inp = session.get_inputs()[0]
    channels = inp.shape[1] if isinstance(inp.shape[1], int) else 0

    def run(b: np.ndarray) -> np.ndarray:
        # engine planes beyond the frame's channels (ScaleCert's occlusion mask) are held at 0 (nothing occluded)
        pad = np.zeros((len(b), max(channels - b.shape[1], 0), *b.shape[2:]), np.float32)
        return session.run(["preactivation"], {inp.name: np.concatenate([b, pad], axis=1)})[0].transpose(0, 2, 3, 1)

    return run


def _locality(bundle: Bundle, backend: str, certifier, x: np.ndarray, geometry: Geometry,
              rects: list[tuple[int, int]], trials: int, seed: int, cache: Path) -> dict[str, dict]:
    """The receptive-field checks: what the certifier reads, and on onnxruntime the manifest's ``probe.op`` input."""
    checks: dict[str, dict] = {}
    if certifier.local_outputs:
        checks["outputs"] = probe(certifier.local_features, x, geometry, rects, trials=trials, seed=seed)
    else:
        checks["outputs"] = {"skipped": "the certifier's outputs are not local (e.g. top-k winners); "
                                        "locality is checked on the probe.op input"}
    op = bundle.manifest.get("probe", {}).get("op")
    if op and backend in ONNX_BACKENDS:
        try:  # an extra view where the graph allows it (needs the onnx package to edit the graph)
            run = _preactivation_run(bundle, backend, op, cache)
        except ImportError as err:
            checks["preactivation"] = {"skipped": f"needs the {err.name} package: pip install {err.name}"}
        except Exception as err:
            checks["preactivation"] = {"skipped": f"{type(err).__name__}: {err}"}
        else:
            checks["preactivation"] = {"op": op, **probe(run, x, geometry, rects, trials, seed=seed)}
    return checks


def _batches(certifier, recordings: dict[str, Recording], frames: np.ndarray) -> dict[str, dict]:
    """Batch independence of every engine role (by role) on the inputs the defense makes from ``frames``, at the
    sizes of the calls it made too."""
    certifier.timed_features(frames)
    return {role: batch_probe(rec.engine.run, np.concatenate([x for x, _ in rec.calls]), rec.engine.max_batch,
                              sizes={len(x) for x, _ in rec.calls}, atol=certifier.batch_atol())
            for role, rec in recordings.items()}


def _relied_on(certifier) -> bool:
    """Whether the runtime relies on the certifier's backend computing exactly what the probe checks: the manifest
    lists it in ``probe.exact_backends``, or the defense reads no local outputs and needs no verified backend
    (cropping: on any backend its certificates hold only if each row moves by at most ``batch_atol`` between
    batches)."""
    listed = certifier.engine.name in certifier.exact_backends()
    return listed or not (certifier.needs_exact or certifier.local_outputs)


NOT_LOCAL = "the bundle has no geometry: nothing local to probe"


def _probe_backend(bundle: Bundle, backend: str, x: np.ndarray, frames: np.ndarray, geometry: Geometry | None,
                   rects: list[tuple[int, int]], trials: int, seed: int, builder: Callable | None,
                   cache: Path) -> dict:
    """One backend's report: skipped (it cannot run here), passed or failed (with the first error). Without a
    geometry there is nothing local to probe: batch independence alone is checked."""
    try:
        options = engine_options(backend, builder=builder)
        recordings = {r: Recording(load_engine(bundle, backend, role=r, **options)) for r in roles(bundle)}
    except EngineError as err:
        return {"status": "skipped", "reason": str(err), "listed_exact": False}
    certifier = certifier_with(bundle, recordings)
    report: dict = {"status": "passed", "checks": {}, "listed_exact": _relied_on(certifier)}
    try:
        report["checks"] = (_locality(bundle, backend, certifier, x, geometry, rects, trials, seed, cache)
                            if geometry is not None else {"outputs": {"skipped": NOT_LOCAL}})
        if geometry is None or any("trials" in c for c in report["checks"].values()):  # then the batch sizes
            report["batch"] = _batches(certifier, recordings, frames)
    except Exception as err:  # ProbeError, or the engine failing while probed: either way not verified
        return {**report, "status": "failed", "error": str(err) if isinstance(err, ProbeError)
                else f"{type(err).__name__}: {err}"}
    if "batch" not in report:  # a geometry whose locality could not be probed here: not a pass
        return {"status": "skipped", "listed_exact": report["listed_exact"],
                "reason": "; ".join(c["skipped"] for c in report["checks"].values()) or "no check applies"}
    return report


def probe_bundle(bundle: str | Path | Bundle, trials: int = 64, seed: int = 0, backends: list[str] | None = None,
                 builder: Callable | None = None) -> dict[str, dict]:
    """Re-run the probes on a bundle's own (hash-verified) engines, on every backend here that can run them.

    Guards against a manifest whose geometry was edited after export, and against a backend whose kernels mix
    pixels the geometry says they must not, or depend on the batch. ``backends``: default
    :func:`candidate_backends`; each gets a report with ``status`` ``passed``, ``failed`` (``error``) or
    ``skipped`` (``reason``: not installed, no GPU, no engine of its format, no model ``builder`` for torch;
    default builder: the trainer's). Checks on each backend: ``outputs``, what the certifier reads
    (``Certifier.local_features``, (N, H', W', C)); on onnxruntime also ``preactivation``, the NCHW input of the
    manifest's ``probe.op`` (before a threshold: far more sensitive). Where either ran, or where the bundle has no
    geometry (nothing local, e.g. pixel-space double masking), the report's ``batch`` holds, per engine role,
    :func:`batch_probe` on the engine inputs the defense makes from random frames, up to the engine's largest
    batch. ``listed_exact``: whether the runtime relies on the backend (see :func:`_relied_on`); a failure there
    is a failure, elsewhere it is expected. Locality inputs are random normalized images; patches use the bundle
    threat's rectangles and 1x1. One backend's failure does not stop the others.
    """
    loaded = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    m = loaded.manifest
    geometry = Geometry.from_dict(m["geometry"]) if "geometry" in m else None
    hw = geometry.input_hw if geometry is not None else tuple(m["input"]["hw"])
    rects = sorted(set(parse(m["threat"], input_hw=hw).rects) | {(1, 1)})
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(8, m["input"]["channels"], *hw)).astype(np.float32)
    frames = rng.integers(0, 256, size=(4, *hw, m["input"]["channels"]), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="certinfer-probe-") as cache:
        return {name: _probe_backend(loaded, name, x, frames, geometry, rects, trials, seed, builder, Path(cache))
                for name in (backends if backends is not None else candidate_backends(loaded))}
