"""The Certifier: prepare -> infer (engine calls) -> certify (pure numpy), one Verdict per frame.

A defense subclasses :class:`Certifier` and implements two phases:

- :meth:`Certifier.infer` turns prepared frames (float32 NCHW, normalized) into the defense's *features*,
  calling the engine only through :meth:`Certifier.run_engine` (any number of times, any engine role). Building
  crops, ablations, occlusions or masks is preparation; only time inside :meth:`run_engine` counts as engine time.
- :meth:`Certifier.decide` turns features into one :class:`Decision` per frame for given :class:`Options`. It is
  pure: the same features and options always give the same decisions, so one inference serves many option sets.

Trust is one mechanism here: a defense whose certificates rely on bit-exact engine behaviour declares
``needs_exact``; its certificates hold only when every engine role runs on a backend the bundle's export
verified (``probe.exact_backends``) at the precision it verified (fp32). Otherwise :meth:`certify` withdraws
them, with the reason. Frame validation and resizing live in :mod:`certinfer.runtime.frames`.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np

from certinfer.threat import Threat, parse
from certinfer.runtime.frames import resize, validate_frames
from certinfer.runtime.regions import MIN_ROI, RegionCalls
from certinfer.runtime.verdict import Certificate, RectCert, Verdict

Features = Any  # a defense's inference result: whatever its decide() reads (arrays, a small dataclass)


class EngineRunError(RuntimeError):
    """The engine raised, or returned outputs that do not fit the batch (wrong shape, non-finite values)."""


@dataclass
class Decision:
    """What a defense decides for one frame from its features."""

    label: int
    certificate: Certificate
    status: str = ""  # empty: certified/uncertified from the certificate
    scores: list[float] | None = None
    reason: str = ""


@dataclass(frozen=True)
class Options:
    """A defense's certification options; each defense subclasses it with its own fields.

    ``INFER`` names the fields that change what :meth:`Certifier.infer` computes (window sets, crop counts);
    two certifiers that agree on them and on the threat can share one inference.
    """

    INFER: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Options:
        """The options a bundle's ``defense.params`` set (unknown keys are other settings, ignored here)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})


EXACT_PRECISION = "fp32"  # the precision the export's locality and rounding checks verify
TIE_TOLERANCE = 1e-3  # logit units: the near-tie band on fp32 backends not verified batch-independent


class _EngineClock(threading.local):
    """Engine seconds accumulated by each thread (a certifier may be shared by several threads)."""

    seconds = 0.0


@dataclass
class EngineTime:
    """The engine seconds spent inside one :meth:`Certifier.engine_clock` block."""

    seconds: float = 0.0


class Certifier(RegionCalls):
    """Base class: a bundle's engines plus its defense's certification math.

    Sharing: one Certifier may be called from several threads at once (e.g. one per camera) and gives each
    call the verdicts a sequential call would. Preparation and certification run concurrently (they only read
    the certifier's state); engine calls are serialized by a per-certifier lock shared with its
    :meth:`with_options` copies, so each engine call runs alone on the engine (onnxruntime sessions, TensorRT
    contexts and CUDA graphs keep per-call state). For parallel engine work load one Certifier per thread.
    A Certifier is immutable: derive variants with :meth:`with_options` and :meth:`seeded`.
    Calling it, ``certifier(frames, rois=None)``, certifies whole frames or a detector's boxes
    (:mod:`certinfer.runtime.regions`).
    """

    name: ClassVar[str] = ""  # the registry name of the defense
    Options: ClassVar[type[Options]] = Options
    roles: ClassVar[tuple[str, ...]] = ("model",)  # the bundle's engine roles this defense runs
    needs_exact: ClassVar[bool] = False  # certificates hold only on verified backends (see the module docstring)
    randomized: bool = False  # infer draws random numbers (OS entropy unless seeded); a defense may make it a property
    local_outputs: ClassVar[bool] = False  # local_features() is a map the export probe checks against geometry
    threat_in_features: ClassVar[bool] = True  # infer's features depend on the threat (windows, masks, locations)

    @classmethod
    def roles_for(cls, manifest: Mapping[str, Any]) -> tuple[str, ...]:
        """The engine roles this defense runs for a bundle (what the loader opens); default: ``roles``."""
        return cls.roles

    def __init__(self, bundle, engines: Mapping[str, Any], threat: Threat, options: Options | None = None):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.roles = self.roles_for(self.manifest)
        missing = [r for r in self.roles if r not in engines]
        if missing:
            raise ValueError(f"{self.name or type(self).__name__}: no engine for role(s) {', '.join(missing)}")
        self.engines = {r: engines[r] for r in self.roles}
        inp = self.manifest["input"]
        self.input_hw = (int(inp["hw"][0]), int(inp["hw"][1]))
        self.classes: list[str] = list(inp["classes"])
        self._mean = np.asarray(inp["mean"], np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(inp["std"], np.float32).reshape(1, -1, 1, 1)
        self.threat = threat.bind(self.input_hw)
        self.options = options if options is not None else self.Options.from_params(self.params)
        self.trusted, self.distrust_reason = self._trust()
        self.rng = np.random.default_rng()  # OS entropy: a randomized defense's draws must be unpredictable
        self._lock = threading.Lock()
        self._rng_lock = threading.Lock()
        self._clock = _EngineClock()

    # --- what the bundle says ---------------------------------------------------------------------------------

    @property
    def params(self) -> dict:
        return self.manifest["defense"].get("params", {})

    @property
    def default_threat(self) -> str:
        """The bundle's own threat spec."""
        return self.manifest["threat"]

    @property
    def min_roi(self) -> int:
        """The smallest box side (pixels) this bundle accepts as a region of interest."""
        return int(self.manifest["input"].get("min_roi", MIN_ROI))

    @property
    def engine(self):
        """The ``model`` role's engine (or the first role's): its name is the Verdict's backend."""
        return self.engines[self.roles[0]]

    @property
    def kind(self) -> str:
        """The certificate kind this certifier issues: ``recovery``, ``detection`` or ``probabilistic``."""
        return "recovery"

    def exact_backends(self) -> list[str]:
        """The backends the bundle's export verified bit-exact (or, for bounds, against float64)."""
        probe = self.manifest.get("probe", {})
        return list(probe.get("exact_backends", self.params.get("verified_backends", [])))

    def batch_atol(self) -> float:
        """How far an engine output may differ between batch sizes without voiding a certificate (what the
        batch-independence probe allows); 0: bit for bit."""
        return 0.0

    def _trust(self) -> tuple[bool, str]:
        exact = self.exact_backends()
        for role, engine in self.engines.items():
            precision = getattr(engine, "precision", EXACT_PRECISION)
            if engine.name not in exact:
                return False, (f"backend {engine.name} ({role}) is not verified for this bundle "
                               f"(verified: {', '.join(exact) or 'none'}); not certified")
            if precision != EXACT_PRECISION:
                return False, f"{role} engine runs in {precision}, verified only in {EXACT_PRECISION}; not certified"
        return True, ""

    # --- variants ---------------------------------------------------------------------------------------------

    def with_options(self, threat: str | Threat | None = None, **changes: Any) -> Certifier:
        """A copy with other options (and/or threat) that shares the engines and their lock."""
        twin = copy.copy(self)
        if threat is not None:
            twin.threat = (parse(threat, input_hw=self.input_hw) if isinstance(threat, str) else threat).bind(
                self.input_hw)
        if changes:
            twin.options = dataclasses.replace(self.options, **changes)
        twin._clock = _EngineClock()
        twin._validate()
        return twin

    def seeded(self, seed: int) -> Certifier:
        """A copy whose random draws come from ``seed``: ONLY for tests and reproducible benchmarks. Whoever
        knows the seed knows the draws, and a probabilistic certificate no longer holds against them."""
        twin = copy.copy(self)
        twin.rng = np.random.default_rng(seed)
        twin._rng_lock = threading.Lock()
        twin._clock = _EngineClock()
        return twin

    def infer_key(self) -> tuple:
        """Certifiers with equal keys (same engines) compute the same features for the same frames."""
        threat = str(self.threat) if self.threat_in_features else ""
        return (threat, *(getattr(self.options, f) for f in self.options.INFER))

    def _validate(self) -> None:
        """Check this certifier's options against the bundle; raise ValueError with what is wrong."""

    # --- the phases -------------------------------------------------------------------------------------------

    def prepare(self, frames: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) frames -> float32 NCHW, resized and normalized as the manifest says."""
        x = resize(validate_frames(frames), self.input_hw).astype(np.float32) / 255.0
        return np.ascontiguousarray((x.transpose(0, 3, 1, 2) - self._mean) / self._std, dtype=np.float32)

    def infer(self, x: np.ndarray) -> Features:
        """The defense's features for prepared frames (calls the engine through :meth:`run_engine`)."""
        raise NotImplementedError

    def decide(self, features: Features, options: Options) -> list[Decision]:
        """The defense's pure certification: one Decision per frame."""
        raise NotImplementedError

    def certify(self, features: Features, options: Options | None = None) -> list[Decision]:
        """:meth:`decide` under ``options`` (default: this certifier's), certificates withdrawn when not trusted."""
        decisions = self.decide(features, self.options if options is None else options)
        if self.needs_exact and not self.trusted:
            for d in decisions:
                d.certificate = withdrawn(d.certificate)
                d.reason = d.reason or self.distrust_reason
        return decisions

    def local_features(self, x: np.ndarray) -> np.ndarray:
        """(N, H', W', C) outputs whose cells depend only on their receptive field (when ``local_outputs``)."""
        raise NotImplementedError(f"{self.name}: no local outputs to probe")

    # --- the engine -------------------------------------------------------------------------------------------

    def output_shapes(self, role: str = "model") -> tuple[tuple[int, ...], ...] | None:
        """Per-sample shape of each output of a role's engine, where the defense knows it (checked every call)."""
        return None

    def run_engine(self, batch: np.ndarray, role: str = "model"):
        """One engine call (chunked by the engine); the only time that counts as engine time.

        Returns the outputs as the engine gives them (an array, or a tuple for several outputs). Any failure or
        misshapen output raises :class:`EngineRunError`.
        """
        return self.call_engine(role, len(batch), lambda engine: engine.run(batch))

    def call_engine(self, role: str, rows: int, call: Callable[[Any], Any]):
        """``call(engine)`` for one of the engine's methods giving ``rows`` outputs, timed and checked like
        :meth:`run_engine` (for capabilities beyond ``run``, such as building masked copies on the device)."""
        engine = self.engines[role]
        t0 = time.perf_counter()
        try:
            with self._lock:
                outputs = call(engine)
        except Exception as e:
            raise EngineRunError(f"{role} engine failed: {type(e).__name__}: {e}") from e
        finally:
            self._clock.seconds += time.perf_counter() - t0
        self._check_outputs(role, rows, outputs)
        return outputs

    def _check_outputs(self, role: str, n: int, outputs) -> None:
        arrays = outputs if isinstance(outputs, tuple) else (outputs,)
        expected = self.output_shapes(role)
        if expected is not None and len(expected) != len(arrays):
            raise EngineRunError(f"{role} engine returned {len(arrays)} outputs, expected {len(expected)}")
        for i, a in enumerate(arrays):
            if not isinstance(a, np.ndarray) or a.ndim < 1 or a.shape[0] != n:
                shape = getattr(a, "shape", type(a).__name__)
                raise EngineRunError(f"{role} engine output {i} has shape {shape}, expected a batch of {n}")
            if expected is not None and a.shape[1:] != tuple(expected[i]):
                raise EngineRunError(f"{role} engine output {i} has shape {a.shape}, "
                                     f"expected (N, *{tuple(expected[i])})")
            if not np.isfinite(a).all():
                raise EngineRunError(f"{role} engine output {i} has NaN or inf values")

    @contextmanager
    def engine_clock(self) -> Iterator[EngineTime]:
        """Measure the engine seconds spent by this thread inside the block (``clock.seconds``)."""
        start = self._clock.seconds
        clock = EngineTime()
        try:
            yield clock
        finally:
            clock.seconds = self._clock.seconds - start

    # --- one call ---------------------------------------------------------------------------------------------

    def timed_features(self, frames: np.ndarray) -> tuple[Features, dict[str, float]]:
        """Prepare and infer; seconds spent preparing (resize, normalize, building engine batches) and in the engine."""
        if self.threat.camera:
            raise ValueError(f"threat {self.threat} is in camera pixels: certify through certifier(frames, rois=...), "
                             "which maps it to model pixels for each frame or box")
        t0 = time.perf_counter()
        with self.engine_clock() as clock:
            features = self.infer(self.prepare(frames))
        total = time.perf_counter() - t0
        return features, {"prepare": total - clock.seconds, "engine": clock.seconds}

    def certify_frames(self, frames: np.ndarray) -> list[Verdict]:
        """One verdict per whole frame, against this certifier's model-pixel threat."""
        features, seconds = self.timed_features(frames)
        t0 = time.perf_counter()
        decisions = self.certify(features)
        seconds["certify"] = time.perf_counter() - t0
        n = len(decisions)
        timings = {k: v * 1e3 / n for k, v in seconds.items()}
        timings["total"] = sum(timings.values())
        return [self.verdict(d, timings) for d in decisions]

    def verdict(self, d: Decision, timings: dict[str, float]) -> Verdict:
        status = d.status or ("certified" if d.certificate.certified else "uncertified")
        name = self.classes[d.label] if 0 <= d.label < len(self.classes) else ""
        return Verdict(label=int(d.label), class_name=name, status=status, certificate=d.certificate,
                       scores=d.scores, reason=d.reason, timings_ms=dict(timings), backend=self.engine.name)


def withdrawn(cert: Certificate) -> Certificate:
    """The certificate with every rectangle uncertified (margins capped at 0): what an untrusted backend gets."""
    per_rect = {k: RectCert(False, min(r.margin, 0.0)) for k, r in cert.per_rect.items()}
    return Certificate(threat=cert.threat, certified=False, per_rect=per_rect, kind=cert.kind, p=cert.p)
