"""``certinfer certify``: certified accuracy of a bundle on a dataset, per rectangle and per threat.

Results are JSON with integer counts, so ``--shard i/n`` slices of one dataset can run anywhere and
``certinfer certify --merge`` adds them up. A plot shows certified accuracy per rectangle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import certinfer
from certinfer.runtime.evaluate import evaluate_certifier, merge, shard_indices, summarize
from certinfer.threat import parse
from certinfer.train import data as datasets

SQUARES = ",".join(f"{k}x{k}" for k in range(1, 11))  # BagCert Fig. 3: square patches 1..10


def _progress(total: int):
    from rich.progress import Progress

    bar = Progress(transient=True, console=None)
    task = bar.add_task("certify", total=total)
    return bar, lambda n: bar.advance(task, n)


def run(bundle: Path, data: str, threat: str | None, backend: str, batch: int, limit: int | None, shard: str,
        variants_for=None, extra_threat: str | None = None, sha256: str | None = None) -> dict:
    """Evaluate ``bundle`` on ``data``; ``variants_for(certifier)`` may name several decision rules. ``sha256``:
    refuse the bundle unless its digest is this one (the CLI pins the digest it verified)."""
    certifier = certinfer.load(bundle, backend=backend, threat=threat, expect_sha256=sha256)
    user_threat = certifier.threat
    if extra_threat:
        certifier.threat = parse(f"{user_threat},{extra_threat}", input_hw=certifier.input_hw)
    split = datasets.load(data)
    idx = shard_indices(len(split.y), shard)
    idx = idx[:limit] if limit else idx
    bar, advance = _progress(len(idx))
    with bar:
        result = evaluate_certifier(certifier, split.x[idx], split.y[idx], batch=batch,
                                    variants=variants_for(certifier) if variants_for else None,
                                    progress=advance, threat_keys=user_threat.keys if extra_threat else None)
    result.update({"threat": str(user_threat), "data": data, "data_note": split.note, "shard": shard,
                   "bundle": str(bundle), "defense": certifier.manifest["defense"]})
    return result


def report(result: dict, out: Path | None, plot: Path | None, plotter=None) -> None:
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
        (plotter or plot_result)(result, Path(plot))


def _square_side(key: str) -> int | None:
    h, w = key.split("x")
    return int(h) if h == w else None


def plot_result(result: dict, path: Path) -> None:
    """Left: certified accuracy against square patch side (BagCert Fig. 3); right: every other rectangle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (sq, other) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.4]})
    names = list(result["certified_accuracy_per_rect"])
    for i, (name, per) in enumerate(result["certified_accuracy_per_rect"].items()):
        squares = sorted((_square_side(k), v) for k, v in per.items() if _square_side(k))
        sq.plot([s for s, _ in squares], [v for _, v in squares], marker="o", label=f"certified ({name})")
        rest = [(k, v) for k, v in per.items() if not _square_side(k)]
        width = 0.8 / len(names)
        other.bar([j + i * width for j in range(len(rest))], [v for _, v in rest], width, label=f"certified ({name})")
        other.set_xticks([j + 0.4 - width / 2 for j in range(len(rest))], [k for k, _ in rest], rotation=45)
    for ax in (sq, other):
        ax.axhline(result["clean_accuracy"], color="grey", linestyle="--", label="clean")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    sq.set_xlabel("square patch side (model-input pixels)")
    other.set_xlabel("non-square patches (h x w)")
    title = f"{result['defense']['kind']} on {result['data']}"
    fig.suptitle(title + (f" ({result['data_note']})" if result.get("data_note") else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge_files(files: list[Path], out: Path | None, plot: Path | None) -> dict:
    results = [json.loads(Path(f).read_text()) for f in files]
    merged = merge(results)
    for key in ("data", "data_note", "bundle", "defense"):
        merged[key] = results[0].get(key)
    for key in ("shapes", "shape_names", "seed", "note", "windows"):  # a defense's own settings, where recorded
        if key in results[0]:
            merged[key] = results[0][key]
    if "scalecert" in results[0]:
        merged["scalecert"] = merge_scalecert(results)
    merged["shards"] = [r.get("shard") for r in results]
    plotters = {"masking": plot_variants, "cropping": plot_cropping, "ibp": plot_ibp, "scalecert": plot_scalecert}
    report(merged, out, plot, plotters.get((merged.get("defense") or {}).get("kind")))
    return merged


def bagcert(bundle: Path, data: str, threat: str | None, backend: str, batch: int, limit: int | None, shard: str,
            out: Path | None, plot: Path | None, params: dict[str, str], sha256: str | None = None) -> dict:
    """BagCert: Conditions 3.2 and 3.3 from one engine pass, and square patches 1..10 for the Fig. 3 plot."""
    def variants(c):
        return {cond: (lambda x, o, cond=cond: c.decide(x, o, condition=cond)) for cond in ("3.2", "3.3")}

    squares = params.get("squares", SQUARES)
    result = run(bundle, data, threat, backend, batch, limit, shard, variants, extra_threat=squares or None,
                 sha256=sha256)
    report(result, out, plot)
    return result



def masking(bundle: Path, data: str, threat: str | None, backend: str, batch: int, limit: int | None, shard: str,
            out: Path | None, plot: Path | None, params: dict[str, str], sha256: str | None = None) -> dict:
    """PatchGuard: each named variant at each threat, all from one engine pass.

    The threat is part of the defense (its windows are what masking removes), so every threat is its own
    variant ``name@threat``. Defaults: Mask-BN and CBN for local-logit bundles, Mask-DS and DRS for ablation
    bundles, at 2x2 and 5x5. ``-p variants=mask-bn,cbn -p threats=2x2;5x5;2.4%`` choose others.
    """
    from certinfer.runtime.defenses.masking import VARIANTS, Aggregation

    threats = (threat or params.get("threats", "2x2;5x5")).split(";")

    def variants(c):
        names = params.get("variants") or ("mask-bn,cbn" if c.source == "local-logits" else "mask-ds,drs")
        chosen = {}
        for name in names.split(","):
            agg = Aggregation.from_params(VARIANTS[name])
            for t in threats:
                bound = parse(t, input_hw=c.input_hw)
                chosen[f"{name}@{t}"] = lambda x, o, a=agg, b=bound: c.decide(x, o, aggregation=a, threat=b)
        return chosen

    result = run(bundle, data, None, backend, batch, limit, shard, variants, sha256=sha256)
    result["threat"] = ";".join(threats)
    report(result, out, plot, plot_variants)
    return result


def plot_variants(result: dict, path: Path) -> None:
    """Clean and certified accuracy of every ``name@threat`` variant, grouped by threat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["certified_accuracy"])
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [result["clean_accuracy_per_variant"][n] for n in names], 0.4, label="clean")
    ax.bar([x + 0.2 for x in xs], [result["certified_accuracy"][n] for n in names], 0.4, label="certified")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    title = f"{result['defense']['kind']} on {result['data']}"
    ax.set_title(title + (f" ({result['data_note']})" if result.get("data_note") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Randomized cropping (Lin et al.): the patch shapes of Table 4 at 2.4% of a 32x32 input (area >= 24.6 pixels):
# aspect ratio r:1 as w = round(sqrt(A / r)), h = ceil(A / w); rot45: the bounding box of the rotated 5x5 square.
CROP_COUNTS = (64, 128, 256, 512)
CROPPING_SHAPES = {"1:1": "5x5", "2.7:1": "9x3", "6:1": "13x2", "1:2.7": "3x9", "1:6": "2x13", "rot45": "rot45:5x5"}


def cropping_variants(c, threat: str, shapes: str, seed: int) -> dict:
    """Every cropping variant from the per-location predictions of one exhaustive engine pass.

    A crop's prediction depends only on its pixels and location, so drawing n locations and reading their
    predictions is the runtime's draw. Variants: ``r<n>`` / ``nr<n>`` (with / without replacement, n in
    64..512, p_c >= 0.95; without replacement up to the number of locations), ``r128-p<t>`` (thresholds
    0.93..0.99), ``r128@shapes`` (Table 4's patch shapes,
    per rectangle; the whole threat is the worst case), ``exhaustive`` and ``exhaustive@shapes``.
    """
    from certinfer.runtime.defenses.cropping import count_votes, draw_locations

    rng = np.random.default_rng(seed)
    main, table4 = parse(threat, input_hw=c.input_hw), parse(shapes, input_hw=c.input_hw)

    def sampled(n: int, replace: bool, bound, threshold: float = 0.95):
        def decide(x, outputs):
            pred = outputs[0].argmax(-1)
            idx = draw_locations(rng, len(pred), n, pred.shape[1], replace)
            votes = count_votes(np.take_along_axis(pred, idx, axis=1), outputs[0].shape[-1])
            return c.decide_votes(votes, bound, threshold, replace, exhaustive=False)
        return decide

    def exhaustive(bound):
        return lambda x, o: c.decide(x, o, threat=bound, exhaustive=True)

    chosen = {f"{'r' if rep else 'nr'}{n}": sampled(n, rep, main) for rep in (True, False) for n in CROP_COUNTS
              if rep or n <= c.locations}  # without replacement: at most every location once
    chosen |= {f"r128-p{t}": sampled(128, True, main, t) for t in (0.93, 0.97, 0.99)}
    chosen |= {"r128@shapes": sampled(128, True, table4), "exhaustive": exhaustive(main),
               "exhaustive@shapes": exhaustive(table4)}
    return {"r128": chosen.pop("r128"), **chosen}


def cropping(bundle: Path, data: str, threat: str | None, backend: str, batch: int, limit: int | None, shard: str,
             out: Path | None, plot: Path | None, params: dict[str, str], sha256: str | None = None) -> dict:
    """Randomized cropping: every variant (crops, replacement, threshold, patch shape, exhaustive) from one pass
    that classifies every crop location of every image once. ``-p seed=N`` seeds the benchmark's draws (default
    0: reproducible numbers; a deployed certifier draws from the OS's entropy), ``-p shapes=...`` the Table 4 set.
    """
    seed = int(params.get("seed", 0))
    shapes = params.get("shapes", ",".join(CROPPING_SHAPES.values()))

    def variants(c):
        c.mode, c.crops = "exhaustive", c.locations  # the engine pass: every crop location once
        return cropping_variants(c, str(c.threat), shapes, seed)

    result = run(bundle, data, threat, backend, batch, limit, shard, variants, sha256=sha256)
    result.update({"shapes": shapes, "shape_names": CROPPING_SHAPES, "seed": seed,
                   "note": "one engine pass over every crop location; each variant draws its own crops from it"})
    report(result, out, plot, plot_cropping)
    return result


def plot_cropping(result: dict, path: Path) -> None:
    """Paper Tables 3 to 5 as plots: certified accuracy against p_c threshold, number of crops (R / NR), shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = result["certified_accuracy"]
    fig, (thr, crops, shape) = plt.subplots(1, 3, figsize=(14, 4))
    ts = [0.93, 0.95, 0.97, 0.99]
    thr.plot(ts, [acc["r128" if t == 0.95 else f"r128-p{t}"] for t in ts], marker="o")
    thr.set_xlabel("p_c threshold (128 crops, with replacement)")
    for prefix, label in (("r", "with replacement"), ("nr", "without replacement")):
        ns = [n for n in CROP_COUNTS if f"{prefix}{n}" in acc]
        crops.plot(ns, [acc[f"{prefix}{n}"] for n in ns], marker="o", label=f"certified, {label}")
        crops.plot(ns, [result["clean_accuracy_per_variant"][f"{prefix}{n}"] for n in ns], linestyle=":",
                   label=f"clean, {label}")
    crops.axhline(acc["exhaustive"], color="black", linestyle="--", label="exhaustive (deterministic)")
    crops.set_xscale("log", base=2)
    crops.set_xlabel("crops per image")
    crops.legend(fontsize=7)
    per = result["certified_accuracy_per_rect"]["r128@shapes"]
    names = list(per)
    shape.bar(range(len(names)), [per[k] for k in names], 0.4, label="128 crops")
    shape.bar([i + 0.4 for i in range(len(names))], [result["certified_accuracy_per_rect"]["exhaustive@shapes"][k]
                                                     for k in names], 0.4, label="exhaustive")
    shape.set_xticks([i + 0.2 for i in range(len(names))], names)
    shape.set_xlabel("patch rectangle (rot45:5x5 is 8x8)")
    shape.legend(fontsize=7)
    for ax in (thr, crops, shape):
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
    title = f"randomized cropping on {result['data']} ({result['n']} images, threat {result['threat']})"
    fig.suptitle(title + (f"; {result['data_note']}" if result.get("data_note") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ScaleCert's own CIFAR-10 numbers (paper Table 2, ResNet-18): threat -> (clean, certified detection), percent.
SCALECERT_TABLE2 = {"2.4%": (78.9, 75.3), "0.4%": (83.1, 81.0)}


def scalecert(bundle: Path, data: str, threat: str | None, backend: str, batch: int, limit: int | None, shard: str,
              out: Path | None, plot: Path | None, params: dict[str, str], sha256: str | None = None) -> dict:
    """ScaleCert: clean accuracy (Algorithm 1 returns the true label), certified detection accuracy (Algorithm 2),
    evaluated windows per image and time, per threat (default ``2.4%;0.4%``, ``-p threats=...``). Each threat is
    its own run (its windows, hence pass 2, differ); the variant ``<threat>`` holds its counts. ``-p tau=T`` and
    ``-p r=R`` evaluate other window settings than the bundle's (a certificate holds for the detector that runs
    with the same windows)."""
    threats = (threat or params.get("threats", "2.4%;0.4%")).split(";")
    results, windows = {}, {}
    for t in threats:
        counted: list[int] = []

        def variants(c, t=t, counted=counted):
            c.tau, c.r = float(params.get("tau", c.tau)), int(params.get("r", c.r))

            def decide(x, outputs):
                counted.extend(np.sum([sel.sum(axis=1) for sel, _ in outputs[2].values()], axis=0).tolist())
                return c.decide(x, outputs)
            return {t: decide}

        results[t] = run(bundle, data, t, backend, batch, limit, shard, variants, sha256=sha256)
        windows[t] = float(np.mean(counted)) if counted else 0.0
    first = results[threats[0]]
    combined = {"n": first["n"], "clean": first["clean"], "threat": ";".join(threats), "backend": first["backend"],
                "variants": {t: results[t]["variants"][t] for t in threats},
                "seconds": {k: sum(r["seconds"][k] for r in results.values()) for k in first["seconds"]}}
    result = summarize(combined) | {k: first[k] for k in ("data", "data_note", "shard", "bundle", "defense")}
    result["windows"] = {"tau": float(params.get("tau", result["defense"]["params"]["tau"])),
                         "r": int(params.get("r", result["defense"]["params"]["r"]))}
    result["scalecert"] = {t: {"windows_per_image": windows[t], "seconds": results[t]["seconds"],
                               "ms_per_image": 1e3 * sum(results[t]["seconds"].values()) / max(1, results[t]["n"]),
                               "alerts": results[t]["variants"][t]["alert"]} for t in threats}
    result["note"] = ("clean: Algorithm 1 returns the true label (an alert is not correct); certified: correct and "
                      "Algorithm 2 holds; alerts: clean images Algorithm 1 flagged")
    report(result, out, plot, plot_scalecert)
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
    return merged


def plot_scalecert(result: dict, path: Path) -> None:
    """Clean and certified detection accuracy per threat, windows per image, the paper's CIFAR-10 Table 2 beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["certified_accuracy"])
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(names)), 4))
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [result["clean_accuracy_per_variant"][n] for n in names], 0.4, label="clean (ours)")
    ax.bar(xs + 0.2, [result["certified_accuracy"][n] for n in names], 0.4, label="certified detection (ours)")
    if str(result.get("data", "")).startswith("cifar10"):
        paper = [SCALECERT_TABLE2.get(n) for n in names]
        for x, p in zip(xs, paper):
            if p:
                ax.plot([x - 0.4, x], [p[0] / 100] * 2, color="black", linestyle="--")
                ax.plot([x, x + 0.4], [p[1] / 100] * 2, color="black", linestyle=":")
        ax.plot([], [], color="black", linestyle="--", label="paper Table 2 clean (exact CIFAR-10)")
        ax.plot([], [], color="black", linestyle=":", label="paper Table 2 certified")
    extra = result.get("scalecert", {})
    ax.set_xticks(list(xs), [f"{n}\n{extra.get(n, {}).get('windows_per_image', 0):.1f} windows/image, "
                             f"{extra.get(n, {}).get('ms_per_image', 0):.0f} ms" for n in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    title = f"ScaleCert on {result['data']} ({result['n']} images, {result['backend']})"
    ax.set_title(title + (f"\n{result['data_note']}" if result.get("data_note") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# IBP (Chiang et al.): the paper's patch sizes; shape transfer (Table 5) at 4 pixels: every 4-pixel rectangle
# (the 1x4 and 4x1 lines and the square) and the bounding box of the 45-degree rotated 2x2 square (3x3).
IBP_THREAT = "2x2,5x5"
IBP_SHAPES = "area:4,rot45:2x2"


def ibp(bundle: Path, data: str, threat: str | None, backend: str, batch: int, limit: int | None, shard: str,
        out: Path | None, plot: Path | None, params: dict[str, str], sha256: str | None = None) -> dict:
    """IBP: clean accuracy and certified accuracy per rectangle. ``certified`` is for the threat (default 2x2 and 5x5
    together); ``-p shapes=...`` adds rectangles reported per rectangle only (default: Table 5's 4-pixel shapes;
    ``-p shapes=`` for none). Every location of every rectangle goes to the bounds engine."""
    shapes = params.get("shapes", IBP_SHAPES)
    result = run(bundle, data, threat or IBP_THREAT, backend, batch, limit, shard, extra_threat=shapes or None,
                 sha256=sha256)
    result["shapes"] = shapes
    report(result, out, plot, plot_ibp)
    return result


def plot_ibp(result: dict, path: Path) -> None:
    """Certified accuracy per rectangle (the threat's, then the shape-transfer ones), clean accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = next(iter(result["certified_accuracy_per_rect"].values()))
    names = list(per)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
    ax.bar(range(len(names)), [per[k] for k in names], 0.6, label="certified")
    for i, k in enumerate(names):
        ax.text(i, per[k] + 0.01, f"{100 * per[k]:.1f}", ha="center", fontsize=8)
    ax.axhline(result["clean_accuracy"], color="grey", linestyle="--", label="clean")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel(f"patch rectangle (threat {result['threat']}; shape transfer: {result.get('shapes') or 'none'})")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    title = f"IBP on {result['data']} ({result['n']} images)"
    ax.set_title(title + (f"; {result['data_note']}" if result.get("data_note") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
