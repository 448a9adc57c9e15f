"""``certinfer certify``: certified accuracy of a bundle on a dataset, per rectangle and per threat.

Results are JSON with integer counts, so ``--shard i/n`` slices of one dataset can run anywhere and
``certinfer certify --merge`` adds them up. A plot shows certified accuracy per rectangle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import certinfer
from certinfer.runtime.evaluate import evaluate_certifier, merge, shard_indices
from certinfer.threat import parse
from certinfer.train import data as datasets

SQUARES = ",".join(f"{k}x{k}" for k in range(1, 11))  # BagCert Fig. 3: square patches 1..10


def _progress(total: int):
    from rich.progress import Progress

    bar = Progress(transient=True, console=None)
    task = bar.add_task("certify", total=total)
    return bar, lambda n: bar.advance(task, n)


def run(bundle: Path, data: str, threat: str | None, backend: str, batch: int, limit: int | None, shard: str,
        variants_for=None, extra_threat: str | None = None) -> dict:
    """Evaluate ``bundle`` on ``data``; ``variants_for(certifier)`` may name several decision rules."""
    certifier = certinfer.load(bundle, backend=backend, threat=threat)
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
                                    progress=advance, threat_keys=user_threat.keys)
    result.update({"threat": str(user_threat), "data": data, "data_note": split.note, "shard": shard,
                   "bundle": str(bundle), "defense": certifier.manifest["defense"]})
    return result


def report(result: dict, out: Path | None, plot: Path | None) -> None:
    """Print a table to stderr, write JSON and the plot where asked."""
    lines = [f"{result['data']} ({result['n']} images{', ' + result['data_note'] if result.get('data_note') else ''})",
             f"clean accuracy      {result['clean_accuracy']:.4f}"]
    for name, acc in result["certified_accuracy"].items():
        per = "  ".join(f"{k} {v:.4f}" for k, v in result["certified_accuracy_per_rect"][name].items())
        lines.append(f"certified [{name}] {result['threat']}: {acc:.4f}   per rect: {per}")
    if result.get("images_per_second"):
        lines.append(f"throughput          {result['images_per_second']:.1f} images/s on {result['backend']}")
    sys.stderr.write("\n".join(lines) + "\n")
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
    if plot:
        plot_result(result, Path(plot))


def plot_result(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, per in result["certified_accuracy_per_rect"].items():
        keys = list(per)
        ax.plot(range(len(keys)), [per[k] for k in keys], marker="o", label=f"certified ({name})")
    ax.axhline(result["clean_accuracy"], color="grey", linestyle="--", label="clean")
    ax.set_xticks(range(len(keys)), keys, rotation=45)
    ax.set_xlabel("patch (h x w, model-input pixels)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['defense']['kind']} on {result['data']}" + (" (JPEG copy)" if result.get("data_note") else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge_files(files: list[Path], out: Path | None, plot: Path | None) -> dict:
    results = [json.loads(Path(f).read_text()) for f in files]
    merged = merge(results)
    for key in ("data", "data_note", "bundle", "defense"):
        merged[key] = results[0].get(key)
    merged["shards"] = [r.get("shard") for r in results]
    report(merged, out, plot)
    return merged


def bagcert(bundle: Path, data: str, threat: str | None, backend: str, batch: int, limit: int | None, shard: str,
            out: Path | None, plot: Path | None, params: dict[str, str]) -> dict:
    """BagCert: Conditions 3.2 and 3.3 from one engine pass, and square patches 1..10 for the Fig. 3 plot."""
    def variants(c):
        return {cond: (lambda x, o, cond=cond: c.decide(x, o, condition=cond)) for cond in ("3.2", "3.3")}

    squares = params.get("squares", SQUARES)
    result = run(bundle, data, threat, backend, batch, limit, shard, variants, extra_threat=squares or None)
    report(result, out, plot)
    return result

