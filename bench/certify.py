"""``certinfer certify``: certified accuracy of a bundle on a dataset, per rectangle and per threat.

Each defense NAME has an :class:`Evaluation` here named NAME (the registry's ``certify``): how it runs on a
:class:`Job` (its variants are :meth:`Certifier.with_options` copies; those sharing an inference key share one
engine pass), how its result is plotted, and which of its variants is the bundle's own decision rule.

Results are JSON with integer counts, so ``--shard i/n`` slices of one dataset can run anywhere and
``certinfer certify --merge`` adds them up.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from certinfer.bench.bundles import load_certifier
from certinfer.bench.certify_plots import plot_cropping, plot_ibp, plot_rects, plot_scalecert, plot_variants
from certinfer.runtime.certifier import Certifier
from certinfer.runtime.defenses import REGISTRY, canonical
from certinfer.runtime.defenses.cropping import CropVotes, count_votes
from certinfer.runtime.evaluate import evaluate_certifier, merge, shard_indices, summarize
from certinfer.threat import Threat
from certinfer.train import data as datasets
from certinfer.train.background import check_classes

SQUARES = ",".join(f"{k}x{k}" for k in range(1, 11))  # BagCert Fig. 3: square patches 1..10


@dataclass(frozen=True)
class Job:
    """One evaluation: the bundle (refused unless its digest is ``sha256``, when given), the dataset split (under
    ``data_dir``, default: the data root), the threat (None: the defense's default), engine backend and batch,
    the first ``limit`` samples of ``shard`` (``i/n``), and the defense's own ``params`` (``-p KEY=VALUE``)."""

    bundle: Path
    data: str
    threat: str | None = None
    backend: str = "auto"
    batch: int = 64
    limit: int | None = None
    shard: str = "0/1"
    params: dict[str, str] = field(default_factory=dict)
    sha256: str | None = None
    data_dir: Path | None = None

    def load(self, threat: str | None) -> Certifier:
        """The bundle's certifier against ``threat`` (None: the bundle's own)."""
        return load_certifier(self.bundle, self.backend, threat, expect_sha256=self.sha256)


def _progress(total: int):
    from rich.progress import Progress

    bar = Progress(transient=True, console=None)
    task = bar.add_task("certify", total=total)
    return bar, lambda n: bar.advance(task, n)


def evaluate(job: Job, certifier: Certifier, variants: dict | None = None,
             threat_keys: tuple[str, ...] | None = None) -> dict:
    """``certifier`` (and its ``variants``) on the job's samples; ``threat_keys``: the rectangles that make up
    "certified" for the threat (the others are reported per rectangle only)."""
    split = datasets.load(job.data, job.data_dir)
    check_classes(certifier.classes, split.classes, split.name)
    idx = shard_indices(len(split.y), job.shard)
    idx = idx[:job.limit] if job.limit else idx
    bar, advance = _progress(len(idx))
    with bar:
        result = evaluate_certifier(certifier, split.x[idx], split.y[idx], batch=job.batch, variants=variants,
                                    progress=advance, threat_keys=threat_keys)
    return result | {"data": job.data, "data_note": split.note, "shard": job.shard, "bundle": str(job.bundle),
                     "defense": certifier.manifest["defense"]}


def with_rects(job: Job, certifier: Certifier, extra: str, variants: Callable[[Certifier], dict] | None = None) -> dict:
    """Evaluate ``certifier`` against its threat plus the ``extra`` rectangles, which are reported per rectangle
    only: "certified" stays the certifier's own threat's, and so does the result's ``threat``."""
    own = certifier.threat
    if extra:
        certifier = certifier.with_options(threat=f"{own},{extra}")
    result = evaluate(job, certifier, variants(certifier) if variants else None, own.keys if extra else None)
    return result | {"threat": str(own)}


def report(result: dict, out: Path | None, plot: Path | None, plotter: Callable[[dict, Path], None]) -> None:
    """Print a table to stderr, write JSON and the plot where asked."""
    lines = [f"{result['data']} ({result['n']} images{', ' + result['data_note'] if result.get('data_note') else ''})",
             f"clean accuracy      {result['clean_accuracy']:.4f}"]
    for name, acc in result["certified_accuracy"].items():
        per = "  ".join(f"{k} {v:.4f}" for k, v in result["certified_accuracy_per_rect"][name].items())
        clean = result.get("clean_accuracy_per_variant", {}).get(name, result["clean_accuracy"])
        lines.append(f"[{name}] clean {clean:.4f}  certified {acc:.4f}   per rect: {per}")
    if result.get("images_per_second"):
        lines.append(f"throughput          {result['images_per_second']:.1f} images/s on {result['backend']}")
    sys.stderr.write("\n".join(lines) + "\n")
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    if plot:
        plotter(result, Path(plot))


def _default_keys(params: dict, threat: str) -> list[str]:
    return ["default"]


@dataclass(frozen=True)
class Evaluation:
    """A defense's dataset evaluation: ``run(job) -> result``, its ``plot``, ``own_keys(params, threat)`` (the
    variant names that hold the bundle's own decision rule, best first) and ``merge_extra`` (its own figures of
    shard results, beyond the counts)."""

    run: Callable[[Job], dict]
    plot: Callable[[dict, Path], None] = plot_rects
    own_keys: Callable[[dict, str], list[str]] = _default_keys
    merge_extra: Callable[[list[dict]], dict] | None = None

    def __call__(self, job: Job, out: Path | None = None, plot: Path | None = None) -> dict:
        result = self.run(job)
        report(result, out, plot, self.plot)
        return result


def plain(job: Job) -> dict:
    """The bundle's certifier as it is, against the job's threat (default: the bundle's)."""
    return evaluate(job, job.load(job.threat))


def evaluation_of(kind: str | None) -> Evaluation:
    """The registered evaluation of a defense; a plain one (default keys, per-rectangle plot) for others."""
    entry = REGISTRY.get(canonical(kind or ""))
    return entry.load("certify") if entry is not None and entry.certify else Evaluation(plain)


def merge_files(files: list[Path], out: Path | None, plot: Path | None) -> dict:
    """Merge shard results (JSON files of one dataset, bundle and threat), report and plot them."""
    results = [json.loads(Path(f).read_text()) for f in files]
    merged = merge(results)
    for key in ("data", "data_note", "bundle", "defense"):
        merged[key] = results[0].get(key)
    for key in ("shapes", "shape_names", "seed", "note", "windows"):  # a defense's own settings, where recorded
        if key in results[0]:
            merged[key] = results[0][key]
    evaluation = evaluation_of((merged.get("defense") or {}).get("kind"))
    if evaluation.merge_extra is not None:
        merged |= evaluation.merge_extra(results)
    merged["shards"] = [r.get("shard") for r in results]
    report(merged, out, plot, evaluation.plot)
    return merged


# --- BagCert: Conditions 3.2 and 3.3 from one engine pass, square patches 1..10 for the Fig. 3 plot ----------

def _bagcert(job: Job) -> dict:
    return with_rects(job, job.load(job.threat), job.params.get("squares", SQUARES),
                      lambda c: {cond: c.with_options(condition=cond) for cond in ("3.2", "3.3")})


bagcert = Evaluation(_bagcert, own_keys=lambda params, threat: [params.get("condition", "3.2")])


# --- PatchGuard: each named variant at each threat ----------------------------------------------------------

def _masking(job: Job) -> dict:
    """Every threat is its own variant ``name@threat`` (its windows are what masking removes). Defaults: Mask-BN
    and CBN for local-logit bundles, Mask-DS and DRS for ablation bundles, at 2x2 and 5x5;
    ``-p variants=mask-bn,cbn -p threats=2x2;5x5;2.4%`` choose others."""
    from certinfer.runtime.defenses.masking import VARIANTS, MaskingOptions

    threats = (job.threat or job.params.get("threats", "2x2;5x5")).split(";")
    certifier = job.load(None)
    names = job.params.get("variants") or ("mask-bn,cbn" if certifier.source == "local-logits" else "mask-ds,drs")
    unknown = [n for n in names.split(",") if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown masking variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    options = {n: vars(MaskingOptions.from_params(VARIANTS[n])) for n in names.split(",")}
    variants = {f"{n}@{t}": certifier.with_options(threat=t, **o) for n, o in options.items() for t in threats}
    return evaluate(job, certifier, variants) | {"threat": ";".join(threats)}


masking = Evaluation(_masking, plot_variants, own_keys=lambda params, threat: [f"{params.get('variant')}@{threat}"])


# --- Randomized cropping: every variant from one pass over every crop location --------------------------------

# The patch shapes of Table 4 at 2.4% of a 32x32 input (area >= 24.6 pixels): aspect ratio r:1 as
# w = round(sqrt(A / r)), h = ceil(A / w); rot45: the bounding box of the rotated 5x5 square.
CROP_COUNTS = (64, 128, 256, 512)
CROPPING_SHAPES = {"1:1": "5x5", "2.7:1": "9x3", "6:1": "13x2", "1:2.7": "3x9", "1:6": "2x13", "rot45": "rot45:5x5"}


class FromExhaustive:
    """A cropping variant read off an exhaustive certifier's pass: a sampled variant draws its crops (as the
    runtime does, from its own seeded draw) among every location's prediction; an exhaustive one (another
    threat) certifies the pass as it is. For :func:`evaluate_certifier`, it infers as ``source`` does."""

    def __init__(self, source: Certifier, variant: Certifier):
        self.source, self.variant = source, variant

    def infer_key(self) -> tuple:
        return self.source.infer_key()

    def timed_features(self, frames: np.ndarray):
        return self.source.timed_features(frames)

    def certify(self, features: CropVotes) -> list:
        o = self.variant.options
        if o.exhaustive:
            return self.variant.certify(features)
        flat = self.variant.draw(len(features.votes))  # every location is column i of the exhaustive pass
        predictions = np.take_along_axis(features.predictions, flat, axis=1)
        votes = count_votes(predictions, len(self.variant.classes))
        near = None if features.near is None else np.take_along_axis(features.near, flat, axis=1)
        return self.variant.certify(CropVotes(votes, flat, predictions, o.replace, False, near))


def cropping_variants(source: Certifier, shapes: Threat | str, seed: int) -> dict[str, FromExhaustive]:
    """``r<n>`` / ``nr<n>`` (with / without replacement, n in 64..512, p_c >= 0.95; without replacement up to the
    number of locations), ``r128-p<t>`` (thresholds 0.93..0.99), ``r128@shapes`` (Table 4's patch shapes, per
    rectangle; the whole threat is the worst case), ``exhaustive`` and ``exhaustive@shapes``; ``r128`` first.
    Each sampled variant draws from ``seed`` (benchmarks only: a deployed certifier draws from the OS)."""
    def sampled(n: int, replace: bool, threshold: float = 0.95, threat=None) -> FromExhaustive:
        v = source.with_options(threat=threat, crops=n, replace=replace, threshold=threshold, exhaustive=False)
        return FromExhaustive(source, v.seeded(seed))

    chosen = {"r128": sampled(128, True)}
    chosen |= {f"{'r' if rep else 'nr'}{n}": sampled(n, rep) for rep in (True, False) for n in CROP_COUNTS
               if rep or n <= source.locations}
    chosen |= {f"r128-p{t}": sampled(128, True, t) for t in (0.93, 0.97, 0.99)}
    chosen |= {"r128@shapes": sampled(128, True, threat=shapes), "exhaustive": FromExhaustive(source, source),
               "exhaustive@shapes": FromExhaustive(source, source.with_options(threat=shapes))}
    return chosen


def _cropping(job: Job) -> dict:
    """``-p seed=N`` seeds the variants' draws (default 0: reproducible numbers), ``-p shapes=...`` the Table 4
    set."""
    seed = int(job.params.get("seed", 0))
    shapes = job.params.get("shapes", ",".join(CROPPING_SHAPES.values()))
    source = job.load(job.threat).with_options(exhaustive=True)  # the engine pass: every crop location once
    result = evaluate(job, source, cropping_variants(source, shapes, seed))
    return result | {"shapes": shapes, "shape_names": CROPPING_SHAPES, "seed": seed,
                     "note": "one engine pass over every crop location; each variant draws its own crops from it"}


def _cropping_keys(params: dict, threat: str) -> list[str]:
    if params.get("mode") == "exhaustive":
        return ["exhaustive"]
    return [f"{'r' if params.get('replace', True) else 'nr'}{params.get('crops')}"]


cropping = Evaluation(_cropping, plot_cropping, own_keys=_cropping_keys)


# --- ScaleCert: clean and certified detection accuracy, windows per image and time, per threat ----------------

class WindowTally:
    """A ScaleCert certifier that also counts, per frame, the windows its inference evaluated."""

    def __init__(self, certifier: Certifier):
        self.certifier, self.windows = certifier, []

    def infer_key(self) -> tuple:
        return self.certifier.infer_key()

    def timed_features(self, frames: np.ndarray):
        features, spent = self.certifier.timed_features(frames)
        self.windows += np.sum([s.sum(axis=1) for s, _ in features.occlusions.values()], axis=0).tolist()
        return features, spent

    def certify(self, features) -> list:
        return self.certifier.certify(features)


def _scalecert(job: Job) -> dict:
    """Clean: Algorithm 1 returns the true label; certified: Algorithm 2 holds too; per threat (default
    ``2.4%;0.4%``, ``-p threats=...``), each its own run (its windows, hence pass 2, differ); the variant
    ``<threat>`` holds its counts. ``-p tau=T`` and ``-p r=R`` evaluate other window settings than the bundle's
    (a certificate holds for the detector that runs with the same windows)."""
    threats = (job.threat or job.params.get("threats", "2.4%;0.4%")).split(";")
    base = job.load(None)
    windows = {"r": int(job.params.get("r", base.options.r)), "tau": float(job.params.get("tau", base.options.tau))}
    results, tallies = {}, {}
    for t in threats:
        certifier = base.with_options(threat=t, **windows)
        tallies[t] = WindowTally(certifier)
        results[t] = evaluate(job, certifier, {t: tallies[t]})
    first = results[threats[0]]
    combined = {"n": first["n"], "clean": first["clean"], "threat": ";".join(threats), "backend": first["backend"],
                "variants": {t: results[t]["variants"][t] for t in threats},
                "seconds": {k: sum(r["seconds"][k] for r in results.values()) for k in first["seconds"]}}
    result = summarize(combined) | {k: first[k] for k in ("data", "data_note", "shard", "bundle", "defense")}
    result["windows"] = windows
    result["scalecert"] = {t: {"windows_per_image": float(np.mean(tallies[t].windows)) if tallies[t].windows else 0.0,
                               "seconds": results[t]["seconds"],
                               "ms_per_image": 1e3 * sum(results[t]["seconds"].values()) / max(1, results[t]["n"]),
                               "alerts": results[t]["variants"][t]["alert"]} for t in threats}
    result["note"] = ("clean: Algorithm 1 returns the true label (an alert is not correct); certified: correct and "
                      "Algorithm 2 holds; alerts: clean images Algorithm 1 flagged")
    return result


def merge_scalecert(results: list[dict]) -> dict:
    """ScaleCert's per-threat figures of shard results: windows per image weighted by images, times and alerts added."""
    merged, n = {}, max(1, sum(r["n"] for r in results))
    for t in results[0]["scalecert"]:
        parts = [r["scalecert"][t] for r in results]
        seconds = {k: sum(p["seconds"][k] for p in parts) for k in parts[0]["seconds"]}
        merged[t] = {"windows_per_image": sum(p["windows_per_image"] * r["n"] for p, r in zip(parts, results)) / n,
                     "seconds": seconds, "ms_per_image": 1e3 * sum(seconds.values()) / n,
                     "alerts": sum(p["alerts"] for p in parts)}
    return {"scalecert": merged}


scalecert = Evaluation(_scalecert, plot_scalecert, own_keys=lambda params, threat: [threat],
                       merge_extra=merge_scalecert)


# --- IBP: the paper's patch sizes, shape transfer (Table 5) at 4 pixels -----------------------------------

# Every 4-pixel rectangle (the 1x4 and 4x1 lines and the square) and the bounding box of the 45-degree rotated
# 2x2 square (3x3).
IBP_THREAT = "2x2,5x5"
IBP_SHAPES = "area:4,rot45:2x2"


def _ibp(job: Job) -> dict:
    """``certified`` is for the threat (default 2x2 and 5x5 together); ``-p shapes=...`` adds rectangles reported
    per rectangle only (default: Table 5's 4-pixel shapes; ``-p shapes=`` for none). Every location of every
    rectangle goes to the bounds engine."""
    shapes = job.params.get("shapes", IBP_SHAPES)
    return with_rects(job, job.load(job.threat or IBP_THREAT), shapes) | {"shapes": shapes}


ibp = Evaluation(_ibp, plot_ibp)


# --- Double masking: the bundle's certifier as it is (early exit changes no decision) ------------------------

doublemask = Evaluation(plain)
