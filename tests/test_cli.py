"""The ``certinfer`` command line: JSON lines, summary, inspect, one-line errors, --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from certinfer.cli import main


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (so the test defense is registered): exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def installed(*args: str) -> subprocess.CompletedProcess:
    """Run the installed ``certinfer`` entry point in a fresh process."""
    exe = Path(sys.executable).with_name("certinfer")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)


def frames_folder(root: Path, n: int = 3) -> Path:
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"f{i}.png")
    (root / "f9_broken.png").write_bytes(b"\x89PNG broken")
    return root


def test_version():
    result = installed("--version")
    assert result.returncode == 0 and result.stdout.startswith("certinfer ") and not result.stderr


def test_import_stays_light(tmp_path: Path):
    code = ("import sys, certinfer, certinfer.cli, certinfer.runtime.stream, certinfer.annotate; "
            "assert not {'torch', 'onnxruntime', 'cv2'} & set(sys.modules), sorted(sys.modules)")
    # run elsewhere: in the repo root, the source folder certinfer/ would shadow the installed package
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=tmp_path)


def test_inspect_a_real_bundle(tiny_bundle: Path):
    result = installed("inspect", str(tiny_bundle))
    assert result.returncode == 0, result.stderr
    assert "defense     test-argmax" in result.stdout and "model.onnx: onnx fp32" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("verified")


def test_tampered_bundle_is_one_line_error(tiny_bundle: Path):
    model = tiny_bundle / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    result = installed("inspect", str(tiny_bundle))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("certinfer: error: model.onnx: sha256 mismatch")


def test_pinned_bundle_runs_and_any_other_is_refused(capsys, tiny_bundle: Path, tmp_path: Path):
    import certinfer
    from certinfer.export.bundle_writer import reseal
    from certinfer.runtime.bundle import BundleError

    code, out, err = cli(capsys, "inspect", str(tiny_bundle))
    digest = next(line.split()[1] for line in out.splitlines() if line.startswith("digest "))
    assert code == 0 and f"digest      {digest} (manifest sealed)" in out
    src = frames_folder(tmp_path / "frames", n=1)
    code, out, err = cli(capsys, "run", str(src), "-b", str(tiny_bundle), "--bundle-sha256", digest)
    assert code == 0 and len(out.splitlines()) == 2
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["threat"] = "1x1"  # edited and resealed: the bundle's own seal cannot tell, the pin can
    (tiny_bundle / "manifest.json").write_text(json.dumps(manifest))
    reseal(tiny_bundle)
    for command in (["run", str(src), "-b"], ["inspect"]):
        code, out, err = cli(capsys, *command, str(tiny_bundle), "--bundle-sha256", digest)
        assert code == 1 and out == "" and err.count("\n") == 1 and "is not the pinned bundle" in err
    with pytest.raises(BundleError, match="is not the pinned bundle"):
        certinfer.load(tiny_bundle, expect_sha256=digest)


def test_default_bundle_is_sealed():
    import warnings

    import certinfer
    from certinfer.runtime.bundle import load_bundle

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UnsealedBundleWarning
        bundle = load_bundle(certinfer.default_bundle())
    assert bundle.manifest["manifest_sha256"] == bundle.digest


def test_missing_bundle_is_one_line_error(tmp_path: Path):
    result = installed("run", str(tmp_path), "--bundle", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert result.stderr == f"certinfer: error: bundle {tmp_path / 'nope'} does not exist\n"


def test_run_prints_json_lines_and_a_summary(capsys, tiny_bundle: Path, tmp_path: Path):
    src = frames_folder(tmp_path / "frames")
    code, out, err = cli(capsys, "run", str(src), "--bundle", str(tiny_bundle), "--threat", "2x2", "--batch", "2")
    assert code == 0
    verdicts = [json.loads(line) for line in out.splitlines()]
    assert [v["frame"] for v in verdicts] == ["f0.png", "f1.png", "f2.png", "f9_broken.png"]
    assert [v["status"] for v in verdicts] == ["uncertified"] * 3 + ["fail-safe"]
    assert verdicts[0]["certificate"]["threat"] == "2x2" and "2x2" in verdicts[0]["certificate"]["per_rect"]
    assert err == "certinfer: 4 frames in, 4 verdicts out: 3 uncertified, 1 fail-safe (unreadable frame: 1)\n"


def test_run_writes_out_file_and_annotated_frames(capsys, tiny_bundle: Path, tmp_path: Path):
    src = frames_folder(tmp_path / "frames", n=2)
    code, out, _ = cli(capsys, "run", str(src), "-b", str(tiny_bundle), "--out", str(tmp_path / "v.jsonl"),
                       "--annotate", str(tmp_path / "ann"), "--deadline-ms", "60000")
    assert code == 0 and out == ""
    assert len((tmp_path / "v.jsonl").read_text().splitlines()) == 3
    written = sorted(p.name for p in (tmp_path / "ann").iterdir())
    assert written == ["f0.png", "f1.png"]  # the unreadable frame has nothing to draw
    with Image.open(tmp_path / "ann" / "f0.png") as img:
        assert img.size == (260, 260)  # 20x20 enlarged to stay readable


def _detections(path: Path, rows: list[tuple[str, list[tuple[float, float, float, float]]]]) -> Path:
    lines = []
    for frame, boxes in rows:
        dets = [{"id": str(i), "bbox": {"center": {"position": {"x": (x0 + x1) / 2, "y": (y0 + y1) / 2}, "theta": 0},
                                        "size_x": x1 - x0, "size_y": y1 - y0}} for i, (x0, y0, x1, y1) in enumerate(boxes)]
        lines.append(json.dumps({"frame": frame, "detections": dets}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_with_rois_answers_each_box_and_strict_exits_3(capsys, tiny_bundle: Path, tmp_path: Path):
    src = frames_folder(tmp_path / "frames", n=2)
    rois = _detections(tmp_path / "d.jsonl", [("f0.png", [(0, 0, 10, 10), (2, 2, 20, 20)]), ("f1.png", [])])
    code, out, err = cli(capsys, "run", str(src), "-b", str(tiny_bundle), "--rois", str(rois),
                         "--annotate", str(tmp_path / "ann"))
    verdicts = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [(v["frame"], v.get("roi"), v.get("roi_id")) for v in verdicts] == [
        ("f0.png", [0, 0, 10, 10], "0"), ("f0.png", [2, 2, 20, 20], "1"), ("f9_broken.png", None, None)]
    assert err == "certinfer: 3 frames in, 3 verdicts out: 2 uncertified, 1 fail-safe (unreadable frame: 1)\n"
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == ["f0.png", "f1.png"]
    code, _, _ = cli(capsys, "run", str(src), "-b", str(tiny_bundle), "--rois", str(rois), "--strict")
    assert code == 3
    code, _, _ = cli(capsys, "run", str(src / "f0.png"), "-b", str(tiny_bundle), "--strict")
    assert code == 0


def test_run_with_a_camera_threat_maps_it_per_frame(capsys, tiny_bundle: Path, tmp_path: Path):
    src = frames_folder(tmp_path / "frames", n=1)
    code, out, _ = cli(capsys, "run", str(src / "f0.png"), "-b", str(tiny_bundle), "--threat", "5x5@camera")
    cert = json.loads(out)["certificate"]
    assert code == 0 and cert["threat"] == "5x5@camera" and cert["model_threat"] == "6x6"  # 20 -> 16 pixels


def test_bad_rois_file_and_deadline_are_one_line_before_the_run(capsys, tiny_bundle: Path, tmp_path: Path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"frame": 0}\n{"frame": "x", "detections": [{"bbox": 3}]}\n')
    code, out, err = cli(capsys, "run", str(tmp_path), "-b", str(tiny_bundle), "--rois", str(bad))
    assert code == 1 and out == "" and err.count("\n") == 1 and "line 2: each detection needs a bbox" in err
    code, out, err = cli(capsys, "run", str(tmp_path), "-b", str(tiny_bundle), "--deadline-ms", "-1")
    assert code == 1 and out == "" and err == "certinfer: error: --deadline-ms must be >= 0, got -1\n"


def test_errors_are_one_line_and_debug_shows_the_traceback(capsys, tiny_bundle: Path, tmp_path: Path):
    code, out, err = cli(capsys, "run", str(tmp_path / "missing.png"), "-b", str(tiny_bundle))
    assert code == 1 and err == f"certinfer: error: no such file or folder: {tmp_path / 'missing.png'}\n"
    code, _, err = cli(capsys, "--debug", "run", str(tmp_path / "missing.png"), "-b", str(tiny_bundle))
    assert code == 1 and "Traceback (most recent call last)" in err and "SourceError" in err
    assert err.endswith(f"certinfer: error: no such file or folder: {tmp_path / 'missing.png'}\n")


def test_bad_threat_and_usage_errors(capsys, tiny_bundle: Path, tmp_path: Path):
    code, _, err = cli(capsys, "run", str(tmp_path), "-b", str(tiny_bundle), "--threat", "40x40")
    assert code == 1 and err.startswith("certinfer: error: threat '40x40'") and err.count("\n") == 1
    code, _, err = cli(capsys, "run", "--batch", "0")
    assert code == 2 and err.startswith("certinfer: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("args, what", [(["train", "nodefense", "--preset", "gtsrb-cpu"], "defense"),
                                        (["export", "nodefense", "ck", "out"], "defense or tool"),
                                        (["bench", "nobench"], "benchmark")])
def test_unknown_subcommands_name_what_is_available(capsys, args: list[str], what: str):
    code, _, err = cli(capsys, *args)
    assert code == 1 and err.startswith(f"certinfer: error: {args[0]}: no {what} {args[1]!r} (available: ")
    assert err.count("\n") == 1


def test_train_and_export_list_the_registry_and_tools(capsys):
    from certinfer.runtime.defenses import REGISTRY

    _, out, _ = cli(capsys, "train", "--help")
    assert all(name in out for name, d in REGISTRY.items() if d.trainer) and "patchguard" not in out
    _, out, _ = cli(capsys, "export", "--help")
    assert all(name in out for name in ("bagcert", "masking", "trt", "parity", "torch"))


@pytest.mark.parametrize("group", ["train", "export"])
def test_the_older_name_patchguard_runs_masking(capsys, group: str):
    pytest.importorskip("torch")

    def help_of(name: str) -> tuple[int, list[str]]:
        code, out, err = cli(capsys, group, name, "--help")
        assert not err
        return code, [line.strip() for line in out.splitlines() if "Usage:" not in line]  # the usage names the name

    assert help_of("patchguard") == help_of("masking") and help_of("masking")[0] == 0


def test_certify_names_the_bundles_defense(capsys, tiny_bundle: Path):
    code, _, err = cli(capsys, "certify", str(tiny_bundle), "--data", "gtsrb:test", "--threat", "5x5")
    assert code == 1 and err.startswith("certinfer: error: certify: no dataset evaluation for defense 'test-argmax'")


def _plugin(monkeypatch: pytest.MonkeyPatch):
    """A defense 'toy' with a trainer, and a dataset evaluation for the test bundles' defense, in the registry."""
    import types

    import typer

    from certinfer.runtime.defenses import REGISTRY, Defense

    plugin = types.ModuleType("certinfer_test_plugin")
    plugin.app = typer.Typer()

    @plugin.app.command()
    def train(preset: str = typer.Option(...), epochs: int = 1) -> None:
        typer.echo(f"training {preset} for {epochs}")

    plugin.certify = lambda job, out, plot: typer.echo(f"certify {job.data} {job.params} {job.sha256} {out}")
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    monkeypatch.setitem(REGISTRY, "toy", Defense("toy", certifier="certinfer_test_plugin:none",
                                                 trainer="certinfer_test_plugin:app", aliases=("toy-old",)))
    monkeypatch.setitem(REGISTRY, "test-argmax", Defense("test-argmax", certifier="certinfer_test_plugin:none",
                                                         certify="certinfer_test_plugin:certify"))


def test_defenses_plug_in_their_commands(capsys, monkeypatch: pytest.MonkeyPatch, tiny_bundle: Path, tmp_path: Path):
    from certinfer.runtime.bundle import load_bundle

    _plugin(monkeypatch)
    code, out, _ = cli(capsys, "train", "toy", "--preset", "gtsrb-cpu", "--epochs", "3")
    assert (code, out) == (0, "training gtsrb-cpu for 3\n")
    assert cli(capsys, "train", "toy-old", "--preset", "x")[:2] == (0, "training x for 1\n")  # an alias
    code, out, _ = cli(capsys, "certify", str(tiny_bundle), "--data", "gtsrb:test", "-p", "condition=3.3",
                       "--out", str(tmp_path / "r.json"))
    # the digest the CLI verified is pinned for the certify run's own load: a bundle swapped in between is refused
    digest = load_bundle(tiny_bundle).digest
    assert (code, out) == (0, f"certify gtsrb:test {{'condition': '3.3'}} {digest} {tmp_path / 'r.json'}\n")


def test_a_plugin_whose_dependencies_are_missing_says_what_to_install(capsys, monkeypatch: pytest.MonkeyPatch):
    from certinfer import cli as cli_module

    monkeypatch.setitem(cli_module.EXPORT_TOOLS, "toy", "certinfer_no_such_module:app")
    code, _, err = cli(capsys, "export", "toy", "ck", "out")
    assert code == 1 and err == ("certinfer: error: export toy needs certinfer_no_such_module: "
                                 'pip install ".[train]"\n')


def test_bundles_lists_every_packaged_bundle(capsys):
    import certinfer

    code, out, _ = cli(capsys, "bundles", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == certinfer.bundle_names()
    for r in rows:
        assert {"name", "defense", "kind", "threat", "clean", "certified", "command"} <= set(r)
        assert r["kind"] in ("recovery", "detection", "probabilistic") and 0 <= r["certified"] <= r["clean"] <= 1
        assert r["command"].startswith("certinfer train ")
        assert r["images"] == 12630 and r["latency_ms"] > 0 and len(r["sign_groups"]) == 5  # the whole test set
        init = certinfer.load(r["name"], backend="onnxruntime-cpu").manifest["provenance"].get("init")
        if init:  # a fine-tuned model: both trainings, in order
            assert r["command"].startswith(init["command"] + " && certinfer train ") and "--init" in r["command"]
    code, out, _ = cli(capsys, "bundles")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:6] == ["name", "defense", "kind", "threat", "clean", "certified"]
    assert all(any(line.startswith(r["name"] + " ") for line in lines[1:]) for r in rows)



# --- first-time use: the samples' truth, refusals before the run, help everywhere --------------------------------

def test_run_on_the_samples_reports_truth_and_the_correct_counts(capsys):
    import re

    import certinfer

    code, out, err = cli(capsys, "run")
    verdicts = [json.loads(line) for line in out.splitlines()]
    labels = json.loads((certinfer.sample_frames() / "labels.json").read_text())["frames"]
    assert code == 0 and len(verdicts) == 46 and sorted(labels) == sorted(v["frame"] for v in verdicts)
    assert all(v["truth"] == labels[v["frame"]] and v["correct"] == (v["label"] == v["truth"]) for v in verdicts)
    correct = sum(v["correct"] for v in verdicts)
    both = sum(v["correct"] and v["status"] == "certified" for v in verdicts)
    assert re.fullmatch(rf"certinfer: 46 frames in, 46 verdicts out: .*; {correct} of 46 correct, {both} certified "
                        r"and correct\n", err), err


def test_the_samples_truth_is_not_applied_to_a_bundle_of_other_classes(capsys, tiny_bundle: Path):
    code, out, err = cli(capsys, "run", "-b", str(tiny_bundle))
    assert code == 0 and '"truth"' not in out and "correct" not in err


def test_the_samples_readme_says_the_clip_is_from_the_training_set():
    import certinfer

    readme = (certinfer.sample_frames() / "README.md").read_text()
    assert "**training** set, not the test set" in readme and "labels.json" in readme


@pytest.mark.parametrize("args, message", [
    (["--out", "/nonexistent/dir/x.jsonl"], "--out /nonexistent/dir/x.jsonl: no folder /nonexistent/dir"),
    (["--out", "{tmp}"], "--out {tmp} is a folder: give a file name"),
    (["--annotate", "{tmp}/file.txt"], "--annotate {tmp}/file.txt is a file: give a folder")])
def test_unwritable_outputs_are_one_line_before_the_run(capsys, tiny_bundle: Path, tmp_path: Path,
                                                        args: list[str], message: str):
    (tmp_path / "file.txt").write_text("x")
    src = frames_folder(tmp_path / "frames", n=1)
    args = [a.format(tmp=tmp_path) for a in args]
    code, out, err = cli(capsys, "run", str(src), "-b", str(tiny_bundle), *args)
    assert (code, out, err) == (1, "", f"certinfer: error: {message.format(tmp=tmp_path)}\n")


def _frames_of_two_kinds(root: Path) -> Path:
    """``a.jpg`` and ``a.png``: two frames whose annotated files would both be ``a.png``."""
    root.mkdir()
    rng = np.random.default_rng(2)
    for name in ("a.jpg", "a.png", "b.jpeg"):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name)
    return root


def test_annotated_files_are_named_after_their_frames_and_stay_distinct(capsys, tiny_bundle: Path, tmp_path: Path):
    src = _frames_of_two_kinds(tmp_path / "frames")
    code, _, _ = cli(capsys, "run", str(src), "-b", str(tiny_bundle), "--annotate", str(tmp_path / "ann"))
    assert code == 0 and sorted(p.name for p in (tmp_path / "ann").iterdir()) == ["a.png", "a_png.png", "b.png"]


def test_video_frame_names_sort_in_frame_order():
    from certinfer.annotate import file_name

    names = [file_name(f"clip.mp4#{i}") for i in range(12)]
    assert names[2] == "clip_000002.png" and names[10] == "clip_000010.png" and sorted(names) == names
    assert file_name("frame.jpg") == "frame.png" and file_name("camera0#7") == "camera0_000007.png"


def test_a_long_class_name_never_hides_the_status():
    from PIL import ImageDraw

    from certinfer.annotate import _font, draw, fit_text
    from certinfer.runtime.verdict import Verdict

    long = Verdict(label=42, class_name="End of no passing by vehicles over 3.5 metric tons", status="uncertified")
    pen, font = ImageDraw.Draw(Image.new("RGB", (256, 256))), _font(16)
    text = fit_text(pen, long, font, 200)
    assert text.endswith("... | uncertified") and text.startswith("End of") and pen.textlength(text, font=font) <= 200
    boxed = Verdict(label=42, class_name=long.class_name, status="certified", roi=[300, 0, 320, 20])
    assert draw(np.zeros((256, 320, 3), np.uint8), [long, boxed]).size == (320, 256)


def test_run_help_explains_the_annotation_colours(capsys):
    code, out, _ = cli(capsys, "run", "--help")
    assert code == 0 and "green certified, amber uncertified, orange alert, red fail-safe" in " ".join(out.split())


def test_help_shows_the_default_notes_as_written(capsys):
    code, out, _ = cli(capsys, "run", "--help")
    assert code == 0 and "[default: the packaged sample frames]" in " ".join(out.split())


NO_TORCH = "import sys\nsys.modules['torch'] = None  # as on an install without torch\nfrom certinfer.cli import main\n"


@pytest.mark.parametrize("command", [["train", "bagcert"], ["export", "doublemask"], ["bench", "soundness"]])
def test_help_works_without_torch_and_says_what_to_install(tmp_path: Path, command: list[str]):
    def without_torch(*args: str) -> subprocess.CompletedProcess:
        code = NO_TORCH + f"main({list(args)!r})\n"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)

    result = without_torch(*command, "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and not result.stderr
    assert f"{' '.join(command)} needs torch: pip install \".[train]\"" in text and "Usage: certinfer" in text
    assert len(text.split("Usage:")[1]) > 120  # the command's own summary, not just a usage line
    listing = without_torch(command[0], "--help")
    assert listing.returncode == 0 and command[1] in listing.stdout
    run = without_torch(*command, "--out", "x")
    assert run.returncode == 1 and run.stderr == f'certinfer: error: {" ".join(command)} needs torch: pip install ".[train]"\n'


def _npz_root(root: Path, classes: int) -> Path:
    """A data root whose gtsrb:test has ``classes`` class names and three images."""
    (root / "gtsrb").mkdir(parents=True)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "gtsrb" / "gtsrb32.npz", x_test=x, y_test=np.array([0, 1, 2], np.uint8),
             class_names=np.array([f"class {i}" for i in range(classes)]))
    return root


def test_certify_refuses_a_dataset_with_other_classes(capsys, tmp_path: Path):
    root = _npz_root(tmp_path / "data", classes=10)
    code, out, err = cli(capsys, "certify", "default", "--data", "gtsrb:test", "--data-dir", str(root))
    assert (code, out) == (1, "") and err == (
        "certinfer: error: the bundle has 44 classes but gtsrb:test has 10: use the dataset the classifier was "
        "trained for\n")


def test_certify_reads_the_data_folder_it_is_given(capsys, tmp_path: Path):
    root = _npz_root(tmp_path / "data", classes=43)
    code, _, err = cli(capsys, "certify", "default", "--data", "gtsrb:test", "--data-dir", str(root), "--limit", "2",
                       "-p", "squares=")
    assert code == 0 and err.startswith("gtsrb:test (2 images)")


@pytest.mark.parametrize("command", [["certify"], ["bench", "latency"], ["bench", "soundness"],
                                     ["bench", "doublemask-speed"]])
def test_commands_that_read_a_dataset_take_data_dir(capsys, command: list[str]):
    if command[-1] == "soundness":
        pytest.importorskip("torch")
    code, out, _ = cli(capsys, *command, "--help")
    assert code == 0 and "--data-dir" in out


def test_probe_without_onnx_is_partial_and_says_what_to_install(capsys, monkeypatch: pytest.MonkeyPatch):
    from certinfer.export import probe

    monkeypatch.setattr(probe, "candidate_backends", lambda bundle: ["onnxruntime-cpu"])
    monkeypatch.setitem(sys.modules, "onnx", None)  # as on an install without onnx
    code, out, _ = cli(capsys, "inspect", "default", "--probe", "--trials", "2")
    (line,) = [line for line in out.splitlines() if line.startswith("probe ")]
    assert code == 0 and "onnxruntime-cpu: partial (" in line
    assert "preactivation not checked: needs the onnx package: pip install onnx" in line


def test_annotation_names_the_threat_a_certified_box_holds_against():
    from certinfer.annotate import label_text
    from certinfer.runtime.verdict import Certificate, RectCert, Verdict

    cert = Certificate.from_rects("24x24@camera", {"6x6": RectCert(True, 1.0)})
    assert label_text(Verdict(3, "Stop", "certified", cert)) == "Stop | certified 24x24@camera"
    assert label_text(Verdict(3, "Stop", "uncertified", cert)) == "Stop | uncertified"


def test_bench_soundness_takes_a_packaged_bundle_by_name(capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    pytest.importorskip("torch")
    from certinfer.bench import soundness

    attacked = []

    def attack(bundle, checkpoint, data, images, threat, pgd_steps):
        attacked.append(Path(bundle))
        return {"total_flips": 0}

    monkeypatch.setattr(soundness, "defense", lambda kind: type("Entry", (), {"load": lambda self, what: attack})())
    code, _, err = cli(capsys, "bench", "soundness", "--checkpoint", "ckpt", "--bundle", "doublemask-gtsrb",
                       "--out", str(tmp_path / "r.json"))
    assert code == 0, err
    from certinfer.runtime.packaged import resolve

    assert attacked == [resolve("doublemask-gtsrb")]
