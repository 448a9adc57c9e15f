"""How ``certinfer bench latency`` results read: summary lines, the README's markdown table, and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from certinfer.bench.machine import machine_line

STAGE_COLORS = {"prepare": "#8da0cb", "engine": "#66c2a5", "certify": "#fc8d62"}


def defense_label(result: dict) -> str:
    """``bagcert``, ``masking mask-ds``, ``cropping sample`` ...: the defense kind and its variant or mode."""
    d = result["bundle"]["defense"]
    extra = d.get("params", {}).get("variant") or d.get("params", {}).get("mode")
    return f"{d['kind']} {extra}" if extra else d["kind"]


def measured(result: dict) -> dict:
    """The backends of a result that ran (not skipped)."""
    return {k: b for k, b in result["backends"].items() if "skipped" not in b}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _backend_lines(name: str, b: dict) -> list[str]:
    if "skipped" in b:
        return [f"  {name:22s} skipped: {b['skipped']}"]
    st, best = b["batch1"]["stages_ms"], b["best_batch"]
    over1, over = b["batch1"]["certify_over_engine"], best["certify_over_engine"]
    lines = [f"  {b['engine']:22s} batch 1: p50 {st['total']['p50']:.3f} ms  p90 {st['total']['p90']:.3f}  "
             f"p99 {st['total']['p99']:.3f}  (prepare {st['prepare']['p50']:.3f} / engine {st['engine']['p50']:.3f} "
             f"/ certify {st['certify']['p50']:.3f})" + (f"  certify/engine {over1:.1%}" if over1 is not None else ""),
             f"  {'':22s} best batch {best['batch']}: {best['frames_per_second']:.0f} frames/s"
             + (f"  certify/engine {over:.1%}" if over is not None else "") + f"  peak RSS {b['peak_rss_mib']:.0f} MiB"]
    if e := b.get("expansion"):
        lines.append(f"  {'':22s} {e['engine_inputs_per_frame']} engine inputs per frame, built in "
                     f"{e['build_ms_per_frame']:.3f} ms/frame vs engine {e['engine_ms_per_frame']:.3f} ms/frame "
                     f"({_pct(e['build_over_engine'])})")
    if d := b.get("dataset"):
        lines.append(f"  {'':22s} {d['data']} ({d['n']} images, batch {d['batch']}): {d['images_per_second']:.0f} "
                     f"images/s, clean {d['clean_accuracy']:.3f}, certified {d['certified_accuracy']:.3f}")
    return lines


def summary_lines(result: dict) -> list[str]:
    """A few lines per backend, the math against its reference, and where the targets stand."""
    lines = [f"{result['bundle']['defense']['kind']} bundle {result['bundle']['path']} on "
             f"{machine_line(result['machine'])}"]
    for name, b in result["backends"].items():
        lines += _backend_lines(name, b)
    m = result.get("math_vs_reference")
    if m and "skipped" not in m:
        ms = m["ms_per_frame"]
        lines.append(f"  math ({m['threat']}): reference {ms['reference']:.2f} ms/frame, vectorized "
                     f"{ms['vectorized_one_frame_per_call']:.4f} ms/frame one by one ({m['speedup']:.0f}x), "
                     f"{ms['vectorized_batched']:.4f} batched ({m['speedup_batched']:.0f}x); certificates identical "
                     f"on {m['frames_compared']} frames")
    for t in result.get("targets", []):
        value = t["value"]
        shown = "n/a" if value is None else (f"{value:.1%}" if "%" in t["target"] else f"{value:.1f}")
        lines.append(f"  target {'met' if t['met'] else 'MISSED':6s} {t['target']} [{t['backend']}]: {shown}")
    return lines


def _machine_cell(result: dict) -> str:
    m = result["machine"]
    return m["gpus"][0]["name"] if m["gpus"] else f"{m['cpu']} ({m['cores']} cores)"


def markdown_table(results: list[dict]) -> str:
    """One row per measured backend of each result: the table the README shows (with the machine of each row)."""
    rows = ["| bundle | defense | machine | backend | p50 / p99 ms (batch 1) | prepare / engine / certify ms (batch 1 "
            "p50) | certify / engine (batch 1 / best) | best batch: frames/s | engine inputs built / engine "
            "| peak RSS MiB | math speed-up (1 frame / batched) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r.get("math_vs_reference") or {}
        speed = f"{m['speedup']:.0f}x / {m['speedup_batched']:.0f}x" if m.get("speedup") else "n/a"
        for b in measured(r).values():
            st, best = b["batch1"]["stages_ms"], b["best_batch"]
            split = " / ".join(f"{st[k]['p50']:.2f}" for k in ("prepare", "engine", "certify"))
            over = f"{_pct(b['batch1']['certify_over_engine'])} / {_pct(best['certify_over_engine'])}"
            built = _pct(b["expansion"]["build_over_engine"]) if b.get("expansion") else "none"
            rows.append(f"| {Path(r['bundle']['path']).name} | {defense_label(r)} | {_machine_cell(r)} | {b['engine']} "
                        f"| {st['total']['p50']:.2f} / {st['total']['p99']:.2f} | {split} | {over} "
                        f"| {best['frames_per_second']:.0f} (batch {best['batch']}) | {built} "
                        f"| {b['peak_rss_mib']:.0f} | {speed} |")
    return "\n".join(rows)


def _stage_bars(ax, result: dict) -> None:
    labels, rows = [], []
    for b in measured(result).values():
        st, best = b["batch1"]["stages_ms"], b["best_batch"]
        labels += [f"{b['engine']}\nbatch 1 (p50)", f"{b['engine']}\nbatch {best['batch']} (per frame)"]
        rows += [[st[s]["p50"] for s in STAGE_COLORS], [best["per_frame_ms"][s] for s in STAGE_COLORS]]
    values = np.asarray(rows, dtype=float).reshape(-1, len(STAGE_COLORS))
    bottom = np.zeros(len(values))
    for k, (stage, color) in enumerate(STAGE_COLORS.items()):
        ax.bar(range(len(values)), values[:, k], bottom=bottom, label=stage, color=color)
        bottom += values[:, k]
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("ms per frame")
    ax.set_title(f"{defense_label(result)}: latency by stage")
    ax.legend()


def _math_bars(ax, math: dict) -> None:
    ms = math["ms_per_frame"]
    names = ["reference\n(paper loops)", "vectorized\none frame per call", "vectorized\nbatched"]
    values = [ms["reference"], ms["vectorized_one_frame_per_call"], ms["vectorized_batched"]]
    ax.bar(range(3), values, color=["#999999", "#fc8d62", "#e78ac3"])
    ax.set_yscale("log")
    ax.set_xticks(range(3), names, fontsize=8)
    ax.set_ylabel("ms per frame (log scale)")
    ax.set_title(f"certification math, threat {math['threat']}: {math['speedup']:.0f}x / "
                 f"{math['speedup_batched']:.0f}x")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3g} ms", ha="center", va="bottom", fontsize=8)


def plot_result(result: dict, path: Path) -> Path:
    """Latency split by stage per backend (batch 1 p50 and best batch), and vectorized vs reference (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    math = result.get("math_vs_reference")
    has_math = bool(math) and "skipped" not in math
    fig, axes = plt.subplots(1, 2 if has_math else 1, figsize=(12 if has_math else 7, 4.5), squeeze=False)
    _stage_bars(axes[0, 0], result)
    if has_math:
        _math_bars(axes[0, 1], math)
    fig.suptitle(machine_line(result["machine"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
