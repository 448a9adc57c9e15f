"""A defense's vectorized certification math against its plain reference, on the same engine outputs.

Each defense NAME has ``bench/NAME_reference.py`` with ``reference(certifier, frames) -> list[Certificate]``: the
certificates written the obvious way, from the paper, with loops. It may call the certifier's engine (through
``certifier.run_engine``, or ``infer`` for the features the math reads); that engine time is not counted as its
math. :func:`math_vs_reference` times both and fails unless they agree on every compared frame.

A reference declares, with :func:`plain_reference`, how its certificates compare: ``margin_rtol`` (float sums
added up in another order differ in the last bits; integer margins compare exactly) and ``engine_is_math``
(IBP: the bounds are the math, so the runtime's time includes its engine).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from certinfer.runtime.certifier import Certifier, Decision
from certinfer.runtime.verdict import Certificate

Reference = Callable[[Certifier, np.ndarray], list[Certificate]]


def plain_reference(margin_rtol: float = 0.0, engine_is_math: bool = False) -> Callable[[Reference], Reference]:
    """Mark a reference with how its certificates compare with the runtime's (see the module docstring)."""
    def mark(fn: Reference) -> Reference:
        fn.margin_rtol = margin_rtol
        fn.engine_is_math = engine_is_math
        return fn
    return mark


UNVERIFIED_RTOL = 1e-5  # margin tolerance on a backend the export did not verify batch-independent (torch CUDA)


def compare(fast: Decision, slow: Certificate, rtol: float = 0.0) -> list[str]:
    """Differences between the runtime's decision and the reference's certificate; empty when they agree.

    Compared: the rectangles, each one's flag and margin (within ``rtol`` of the reference's, relative to at least
    1), the threat's flag, and, where the reference says (``slow.alert``), whether the frame raises an alert.
    """
    a = fast.certificate
    if set(a.per_rect) != set(slow.per_rect):
        return [f"rectangles differ: {sorted(a.per_rect)} vs {sorted(slow.per_rect)}"]
    diffs = []
    for key, r in a.per_rect.items():
        s = slow.per_rect[key]
        if r.certified != s.certified or abs(r.margin - s.margin) > rtol * max(1.0, abs(s.margin)):
            diffs.append(f"{key}: vectorized ({r.certified}, {r.margin}) vs reference ({s.certified}, {s.margin})")
    if a.certified != slow.certified:
        diffs.append(f"threat: vectorized {a.certified} vs reference {slow.certified}")
    alert = getattr(slow, "alert", None)
    if alert is not None and alert != (fast.status == "alert"):
        diffs.append(f"alert: vectorized {fast.status == 'alert'} vs reference {alert}")
    return diffs


def _best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _timed_math(chunks: list[tuple[Certifier, np.ndarray]], engine_is_math: bool, repeats: int):
    """(seconds, decisions) of the math over every chunk of frames, each certified by its own certifier: on
    features inferred beforehand, or (``engine_is_math``) inference included. Best of ``repeats``."""
    if engine_is_math:
        return _best_of(lambda: [d for c, x in chunks for d in c.decide(c.infer(c.prepare(x)), c.options)], repeats)
    inferred = [(c, c.infer(c.prepare(x))) for c, x in chunks]
    return _best_of(lambda: [d for c, f in inferred for d in c.decide(f, c.options)], repeats)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def math_vs_reference(certifier: Certifier, frames: np.ndarray, reference: Reference, reference_frames: int = 5,
                      reference_seconds: float = 60.0, repeats: int = 3,
                      progress: Callable[[int], None] | None = None) -> dict:
    """Time the certifier's pure certification (:meth:`Certifier.decide`) on ``frames`` against ``reference``.

    The vectorized math runs on all frames, batched (best of ``repeats``) and one frame per call (what a batch-1
    stream pays); the reference on the first ``reference_frames`` (fewer once it has run ``reference_seconds``;
    at least one), one frame per call, extrapolated per frame. Frame i's inference draws from seed i (randomized
    defenses), for the runtime and the reference alike. Raises AssertionError unless every certificate agrees
    (margins within the reference's ``margin_rtol``, at least :data:`UNVERIFIED_RTOL` where the certifier does not
    trust its backends: outside the bundle's ``probe.exact_backends``, or not fp32).
    """
    rtol, engine_is_math = getattr(reference, "margin_rtol", 0.0), getattr(reference, "engine_is_math", False)
    if not certifier.trusted:  # an unverified backend may round a row differently in another batch
        rtol = max(rtol, UNVERIFIED_RTOL)
    n = len(frames)
    t_batched, batched = _timed_math([(certifier.seeded(n), frames)], engine_is_math, repeats)
    t_single, single = _timed_math([(certifier.seeded(i), frames[i:i + 1]) for i in range(n)], engine_is_math,
                                   1 if engine_is_math else repeats)
    mismatches, t_ref, compared = [], 0.0, 0
    while compared < min(reference_frames, n) and (compared == 0 or t_ref < reference_seconds):
        i, plain = compared, certifier.seeded(compared)
        with plain.engine_clock() as clock:
            t0 = time.perf_counter()
            slow = reference(plain, frames[i:i + 1])[0]
            wall = time.perf_counter() - t0
        t_ref += wall - clock.seconds
        mismatches += [f"frame {i}: {d}" for d in compare(single[i], slow, rtol)]
        if not certifier.randomized:  # a randomized batch draws other crops than frame by frame
            mismatches += [f"frame {i} (batched): {d}" for d in compare(batched[i], single[i].certificate, rtol)]
        compared += 1
        if progress:
            progress(1)
    if mismatches:
        raise AssertionError(f"vectorized and reference {certifier.name} certificates differ: "
                             + "; ".join(mismatches[:5]))
    ms = {"vectorized_batched": t_batched * 1e3 / n, "vectorized_one_frame_per_call": t_single * 1e3 / n,
          "reference": t_ref * 1e3 / compared}
    return {
        "defense": certifier.name, "params": certifier.params, "threat": str(certifier.threat),
        "rects": list(certifier.threat.keys), "maps_from_backend": certifier.engine.name,
        "reference": f"{reference.__module__}: {' '.join((reference.__doc__ or '').split())}",
        "engine_counted": engine_is_math, "frames_vectorized": n, "frames_reference": compared,
        "repeats_vectorized": repeats, "ms_per_frame": ms,
        "speedup": _ratio(ms["reference"], ms["vectorized_one_frame_per_call"]),
        "speedup_batched": _ratio(ms["reference"], ms["vectorized_batched"]),
        "identical_certificates": True, "margin_rtol": rtol, "frames_compared": compared,
        "certified_among_compared": int(sum(d.certificate.certified for d in single[:compared])),
    }
