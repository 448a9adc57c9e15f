"""Receptive-field probe: perturb random patches of the real engine and check locality bit for bit.

A certificate over ``Geometry.affected`` is only as good as the claim that a patch changes nothing
else. The probe runs the engine's pre-threshold output (N, H', W', C) on an image and on copies with
a random patch, and requires every output outside ``affected()`` to be bit-identical. It also checks
that a frame's outputs do not depend on the batch it ran in (an attacker's frame may run alone).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from certinfer.runtime.geometry import Geometry


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


def _bits(a: np.ndarray) -> np.ndarray:
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
        ref = _bits(out[0])
        if batch_invariance and not np.array_equal(ref, _bits(run(base[None].astype(np.float32))[0])):
            raise ProbeError("engine outputs depend on the batch a frame runs in: not bit-exact")
        for i, mask in enumerate(masks):
            diff = (_bits(out[i + 1]) != ref).any(axis=-1)
            if (diff & mask).any():
                r, c = np.argwhere(diff & mask)[0]
                raise ProbeError(f"output cell ({r}, {c}) changed although it lies outside the affected range "
                                 f"of a patch: the real receptive field exceeds the manifest geometry")
            changed_inside += int(diff.any())
            checked += 1
    return {"trials": checked, "rects": [list(r) for r in rects], "bit_exact": True,
            "batch_invariant": batch_invariance,
            "patches_that_changed_outputs": changed_inside}


def probe_bundle(bundle_path, trials: int = 64, seed: int = 0) -> dict:
    """Re-run the probe on a bundle's own (hash-verified) ONNX engine, on every onnxruntime provider here.

    Guards against a manifest whose geometry was edited after export: the geometry is checked against the
    engine file itself. Inputs are random normalized images; patches use the bundle threat's rectangles.
    """
    import onnxruntime as ort

    from certinfer.runtime.bundle import load_bundle
    from certinfer.threat import parse

    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    if "geometry" not in m or "op" not in m.get("probe", {}):
        raise ValueError(f"{bundle_path}: this bundle has no geometry to probe")
    geometry = Geometry.from_dict(m["geometry"])
    model = expose_input_of(bundle.read(bundle.engines("model")[0]), m["probe"]["op"])
    rects = sorted(set(parse(m["threat"], input_hw=geometry.input_hw).rects) | {(1, 1)})
    x = np.random.default_rng(seed).normal(size=(8, m["input"]["channels"]) + geometry.input_hw).astype(np.float32)
    reports = {}
    for provider in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        if provider not in ort.get_available_providers():
            continue
        session = ort.InferenceSession(model, providers=[provider])
        name = "onnxruntime-" + provider.removesuffix("ExecutionProvider").lower()
        reports[name] = probe(lambda b: session.run(["preactivation"], {"input": b})[0].transpose(0, 2, 3, 1),
                              x, geometry, rects, trials=trials, seed=seed)
    return reports
