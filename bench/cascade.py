"""``certinfer bench cascade``: a cascade of bundles against each of its stages alone, on the first images of a
test set.

For the cascade (``--bundle`` given several times, in order; default ``default`` then ``doublemask-gtsrb``) and
each stage alone (bound to the cascade's threat), frame by frame (batch 1, a camera's latency): clean accuracy
(the label is right, whatever the status), certified accuracy (certified and right), alert and fail-safe rates,
and the mean and p99 wall-clock time per frame. Then certified accuracy as a function of the latency budget: a
fresh cascade per ``--deadline`` (its latency estimates warmed up as at load) on the same images.
Results: ``--out`` (JSON) and the plot beside it (``.png``).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from tqdm import tqdm

from certinfer.bench.machine import machine_info, machine_line, versions
from certinfer.provenance import git_commit
from certinfer.runtime.cascade import Cascade
from certinfer.runtime.loader import load

BUNDLES = ("default", "doublemask-gtsrb")
DEADLINES = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


def measure(certifier, x: np.ndarray, truth: list[str], desc: str) -> dict:
    """Rates and wall-clock latency of ``certifier`` on uint8 images ``x`` (true class names ``truth``), one frame
    per call; for a cascade, also the share of frames each stage ran on."""
    verdicts, ms = [], []
    for frame in tqdm(x, desc=desc, unit="frame", leave=False):
        t0 = time.perf_counter()
        verdicts += certifier(frame[None])
        ms.append((time.perf_counter() - t0) * 1e3)
    right = np.array([v.class_name == c for v, c in zip(verdicts, truth)])
    status = np.array([v.status for v in verdicts])
    result = {"clean_accuracy": float(right.mean()),
              "certified_accuracy": float((right & (status == "certified")).mean()),
              "alert_rate": float((status == "alert").mean()), "fail_safe_rate": float((status == "fail-safe").mean()),
              "mean_ms": float(np.mean(ms)), "p99_ms": float(np.percentile(ms, 99))}
    if isinstance(certifier, Cascade):
        ran = [{s["stage"] for s in v.stages or []} for v in verdicts]
        result["ran"] = {name: float(np.mean([name in r for r in ran])) for name, _ in certifier.stages}
    return result


def run(cascade: Cascade, x: np.ndarray, truth: list[str], deadlines: list[float]) -> dict:
    """The cascade and each stage alone, then the cascade under each deadline (ms)."""
    configs = {"cascade": measure(cascade, x, truth, "cascade")}
    configs.update({name: measure(stage, x, truth, name) for name, stage in cascade.stages})
    sweep = []
    for d in deadlines:
        budgeted = Cascade(cascade.stages, deadline_ms=d)
        sweep.append({"deadline_ms": d, "estimates_ms": budgeted.latency_ms,
                      **measure(budgeted, x, truth, f"deadline {d:g} ms")})
    return {"configs": configs, "deadline_sweep": sweep}


def plot(result: dict, path: Path) -> Path:
    """Accuracy and alert rate per configuration; certified accuracy against the deadline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = result["configs"]
    fig, (bars, sweep) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(configs)
    width = 0.27
    for k, (key, label, color) in enumerate([("clean_accuracy", "clean", "#66c2a5"),
                                             ("certified_accuracy", "certified", "#8da0cb"),
                                             ("alert_rate", "alert", "#fc8d62")]):
        values = [configs[n][key] for n in names]
        bars.bar(np.arange(len(names)) + (k - 1) * width, values, width, label=label, color=color)
    ticks = [f"{Path(n).name}\n{configs[n]['mean_ms']:.3g} ms mean" for n in names]
    bars.set_xticks(range(len(names)), ticks, fontsize=8)
    bars.set_ylim(0, 1)
    bars.set_ylabel(f"share of {result['images']} images")
    bars.set_title(f"{result['data']}, threat {result['threat']}")
    bars.legend()
    points = result["deadline_sweep"]
    deadlines = [p["deadline_ms"] for p in points]
    sweep.plot(deadlines, [p["certified_accuracy"] for p in points], "o-", color="#4477aa", label="cascade")
    for p in points:
        sweep.annotate(f"{p['mean_ms']:.3g} ms", (p["deadline_ms"], p["certified_accuracy"]), fontsize=7,
                       textcoords="offset points", xytext=(0, 6), ha="center")
    for n, color in zip(names[1:], ["#999999", "#e78ac3", "#a6d854", "#ffd92f"]):
        sweep.axhline(configs[n]["certified_accuracy"], ls="--", lw=1, color=color, label=f"{Path(n).name} alone")
    sweep.set_xscale("log")
    sweep.set_ylim(0, 1)
    sweep.set_xlabel("deadline_ms (per frame; labels: mean ms per frame)")
    sweep.set_ylabel("certified accuracy")
    sweep.set_title("certified accuracy within a latency budget")
    sweep.legend(fontsize=8)
    fig.suptitle(machine_line(result["machine"]) + f", {result['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


cli = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


@cli.command("cascade")
def main(bundle: Optional[list[str]] = typer.Option(
             None, "--bundle", "-b", help="a stage (bundle path or packaged name), in order; give it several "
                                          "times [default: default, doublemask-gtsrb]"),
         images: int = typer.Option(300, min=1, help="the first N images of the test set"),
         data: str = typer.Option("gtsrb:test", help="gtsrb:test, cifar10:test or folder:PATH"),
         data_dir: Optional[Path] = typer.Option(None, help="the data folder [default: ../shared/data]"),
         deadline: Optional[list[float]] = typer.Option(
             None, "--deadline", help="a latency budget (ms per frame) for the sweep; give it several times "
                                      f"[default: {', '.join(f'{d:g}' for d in DEADLINES)}]"),
         threat: Optional[str] = typer.Option(None, help="threat spec [default: the first stage's]"),
         backend: str = typer.Option("auto"),
         out: Path = typer.Option(Path("bench/results/cascade-gtsrb.json"), help="the JSON; the plot goes beside it"),
         ) -> None:
    """Accuracy, alerts and latency of a cascade and of each stage alone; certified accuracy per deadline."""
    from certinfer.train.data import load as load_split

    names = list(bundle or BUNDLES)
    cascade = Cascade([(n, load(n, backend=backend)) for n in names], threat=threat)
    split = load_split(data, data_dir, hw=cascade.input_hw)
    x = split.x[:images]
    truth = [split.classes[int(y)] for y in split.y[:images]]
    result = {"bundles": names, "threat": str(cascade.threat), "data": split.name, "images": len(x),
              "backend": cascade.engine.name, **run(cascade, x, truth, list(deadline or DEADLINES)),
              "machine": machine_info(), "versions": versions(), "commit": git_commit(),
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for name, c in result["configs"].items():
        typer.echo(f"{name:>24}: clean {c['clean_accuracy']:.1%}  certified {c['certified_accuracy']:.1%}  "
                   f"alert {c['alert_rate']:.1%}  {c['mean_ms']:.2f} ms mean, {c['p99_ms']:.2f} p99")
    for p in result["deadline_sweep"]:
        typer.echo(f"{'deadline ' + format(p['deadline_ms'], 'g') + ' ms':>24}: certified "
                   f"{p['certified_accuracy']:.1%}  fail-safe {p['fail_safe_rate']:.1%}  {p['mean_ms']:.2f} ms mean")
    typer.echo(f"wrote {out} and {out.with_suffix('.png').name}")
