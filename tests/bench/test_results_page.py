"""The results page: docs/results.md is exactly what `certinfer bench summary --page` renders from bench/results,
and each kind of result file renders its rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from certinfer.bench.results_page import data_cell, read_results, render_page

REPO = Path(__file__).resolve().parents[2]


def test_committed_page_is_generated_from_committed_results():
    """Hand edits to docs/results.md (or results added without regenerating) fail here: rerun
    `certinfer bench summary --page docs/results.md`."""
    page = render_page(read_results(REPO / "bench" / "results"), source="bench/results")
    assert page == (REPO / "docs" / "results.md").read_text(encoding="utf-8")


def _certify(defense: str | dict, **fields) -> dict:
    return {"bundle": "/x/runs/bundle-a", "defense": defense, "backend": "onnxruntime-cpu", "data": "gtsrb:test",
            "n": 12630, "shard": "0/1", "threat": "5x5", "clean_accuracy": 0.5} | fields


def _write(folder: Path, name: str, result: object) -> None:
    (folder / name).write_text(json.dumps(result), encoding="utf-8")


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    _write(tmp_path, "bagcert-a.json", _certify(
        {"kind": "bagcert", "params": {}}, threat="5x5,2x2",
        certified_accuracy={"3.2": 0.25, "3.3": 0.125},
        certified_accuracy_per_rect={"3.2": {"5x5": 0.25, "2x2": 0.5}, "3.3": {"5x5": 0.125, "2x2": 0.375}}))
    _write(tmp_path, "mask-b.json", _certify(
        {"kind": "patchguard", "params": {}}, n=100, threat="2x2,5x5",
        certified_accuracy={"mask-bn@2x2": 0.3}, clean_accuracy_per_variant={"mask-bn@2x2": 0.6}))
    _write(tmp_path, "scalecert-c.json", _certify(
        {"kind": "scalecert", "params": {}}, bundle="/x/runs/sc/bundle", n=200, threat="2.4%",
        certified_accuracy={"2.4%": 0.1}, variants={"2.4%": {"alert": 50}}, windows={"tau": 0.3},
        scalecert={"2.4%": {"windows_per_image": 47.56, "ms_per_image": 66.4}}))
    _write(tmp_path, "soundness-d.json", {
        "defense": "cropping", "bundle": "runs/bundle-c", "data": "gtsrb:test", "threat": "5x5",
        "backend": "onnxruntime-cpu", "certified_frames_attacked": 3, "patched_frames_evaluated": 9408,
        "pgd_steps": 5, "total_flips": 0, "budget": 470.4})
    _write(tmp_path, "soak-e.json", {
        "bench": "soak", "bundle": "pkg/default", "backend": "onnxruntime-cpu", "frames_in": 1000,
        "verdicts_out": 1000, "batch": 8, "cameras": 2, "engine_threads": 1,
        "statuses": {"certified": 900, "fail-safe": 100}, "fail_safe_reasons": {"invalid frame": 100},
        "frames_per_s": 612.4, "rss_mb": {"growth_after_warmup": 1.5}, "mismatches": []})
    _write(tmp_path, "background-f.json", {
        "bundle": "default", "threat": "5x5", "background_images": 1000, "signs": 500, "false_sign": 0.002,
        "alert": 0.031, "certified_no_sign": 0.954, "false_no_sign": 0.004, "clean": 0.83, "certified": 0.182})
    stage = {"clean_accuracy": 0.9, "certified_accuracy": 0.4, "alert_rate": 0.05, "fail_safe_rate": 0.0,
             "mean_ms": 12.34, "p99_ms": 250.0}
    _write(tmp_path, "cascade-g.json", {
        "bundles": ["default", "doublemask-gtsrb"], "threat": "5x5", "data": "gtsrb:test", "images": 300,
        "backend": "onnxruntime-cpu", "machine": {"cpu": "AMD EPYC", "cores": 2, "gpus": []},
        "configs": {"cascade": stage, "default": stage | {"alert_rate": 0.0}},
        "deadline_sweep": [{"deadline_ms": 5.0, **stage, "fail_safe_rate": 0.5}]})
    counts = {"images": [2] * 43, "right": [2] * 42 + [0], "certified": [1] * 43}
    _write(tmp_path, "testset-h.json", {
        "bundle": "ibp-gtsrb", "engines": ["e"], "threat": "2x2", "data": "gtsrb:test", "data_images": 12630,
        "shard": "0/2,1/2", "classes": ["c"] * 43, "counts": counts, "seconds": 1.0, "commit": "c"})
    _write(tmp_path, "other.json", {"unrelated": True})
    _write(tmp_path, "list.json", [1, 2])
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    return tmp_path


def test_each_kind_of_result_renders_its_rows(results: Path):
    found = read_results(results)
    assert [r["file"] for r in found.certify] == ["bagcert-a.json", "mask-b.json", "scalecert-c.json"]
    assert [len(found.latency), len(found.soundness), len(found.soak)] == [0, 1, 1]
    lines = render_page(found, source="here").splitlines()
    assert "from the result files in `here/`" in lines[2]
    assert "| `bagcert-a.json` | `bundle-a` | `gtsrb:test`, all 12,630 | onnxruntime-cpu | `3.2` | `5x5,2x2` | 50.0 " \
           "| 25.0 | 5x5 25.0, 2x2 50.0 |" in lines
    assert "| `bagcert-a.json` | `bundle-a` | `gtsrb:test`, all 12,630 | onnxruntime-cpu | `3.3` | `5x5,2x2` | 50.0 " \
           "| 12.5 | 5x5 12.5, 2x2 37.5 |" in lines
    masking = lines.index("### PatchGuard masking (Mask-BN, CBN, Mask-DS, DRS)")
    assert lines[masking + 4] == ("| `mask-b.json` | `bundle-a` | `gtsrb:test`, first 100 | onnxruntime-cpu "
                                  "| `mask-bn@2x2` | `2x2` | 60.0 | 30.0 |  |")
    scalecert = lines.index("### ScaleCert")
    assert lines[scalecert + 2].endswith("| clean images alerted | windows / image | tau | ms / image |")
    assert lines[scalecert + 4] == ("| `scalecert-c.json` | `sc/bundle` | `gtsrb:test`, first 200 | onnxruntime-cpu "
                                    "| `2.4%` | `2.4%` | 50.0 | 10.0 | 25.0 | 47.6 | 0.3 | 66 |")
    assert ("| `soundness-d.json` | cropping | `bundle-c` | `gtsrb:test` | `5x5` | onnxruntime-cpu | 3 | 9,408 | 5 "
            "| 0 | 470 |") in lines
    assert ("| `soak-e.json` | `default` | onnxruntime-cpu | 1,000 / 1,000 | 8, 2, 1 | certified 900, fail-safe 100 "
            "| invalid frame 100 | 612 | 1.5 | 0 |") in lines
    assert "## Latency" not in lines
    assert "| `background-f.json` | `default` | `5x5` | 1,000 | 500 | 0.2 | 3.1 | 95.4 | 0.4 | 83.0 | 18.2 |" in lines
    testset = lines.index("## Shipped bundles on the whole test set")
    assert lines[testset + 4].endswith("| certified: speed limits | certified: other prohibitory | certified: danger "
                                       "| certified: mandatory | certified: others |")
    assert lines[testset + 6] == ("| `testset-h.json` | `ibp-gtsrb` | `2x2` | `gtsrb:test`, 86 from shards 0/2, 1/2 "
                                  "| 97.7 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |")
    cascades = lines.index("## Cascades")
    assert lines[cascades + 4] == ("`cascade-g.json`: `default` then `doublemask-gtsrb`, threat `5x5`, `gtsrb:test` "
                                   "first 300, onnxruntime-cpu, AMD EPYC, 2 cores (no GPU)")
    assert lines[cascades + 8:cascades + 11] == ["| cascade | 90.0 | 40.0 | 5.0 | 0.0 | 12.3 | 250.0 |",
                                                 "| default | 90.0 | 40.0 | 0.0 | 0.0 | 12.3 | 250.0 |",
                                                 "| cascade, deadline 5 ms | 90.0 | 40.0 | 5.0 | 50.0 | 12.3 | 250.0 |"]


@pytest.mark.parametrize(("n", "shards", "cell"), [
    (4593, ["0/1"], "all 4,593"),
    (1000, ["0/1"], "first 1,000"),
    (1022, ["0/9", "1/9"], "first 1,022"),
    (511, ["3/9"], "511 from shards 3/9"),
    (900, ["0/9", "1/9"], "900 from shards 0/9, 1/9"),
])
def test_data_cell_says_which_images(n: int, shards: list[str], cell: str):
    assert data_cell({"data": "cifar10:test-exact", "n": n, "shards": shards}) == f"`cifar10:test-exact`, {cell}"


def test_data_cell_of_a_split_of_unknown_size():
    assert data_cell({"data": "folder:x", "n": 5, "shard": "0/1"}) == "`folder:x`, 5"


def test_summary_writes_the_page_without_latency_results(results: Path, tmp_path: Path):
    from certinfer.cli import main

    page = tmp_path / "out" / "results.md"
    with pytest.raises(SystemExit) as e:
        main(["bench", "summary", "--results", str(results), "--page", str(page)])
    assert e.value.code == 0
    assert page.read_text(encoding="utf-8") == render_page(read_results(results), source=str(results))
