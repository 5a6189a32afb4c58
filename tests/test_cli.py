"""The CLI as a user meets it: real subprocesses, exit codes, one-line errors, files left behind."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest


def onnxq(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "onnxq", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def test_run_writes_a_valid_model_and_leaves_no_stray_files(cnn_path: Path, cnn_calib: Path, workdir: Path) -> None:
    before = sha(cnn_path)
    result = onnxq("run", cnn_path, "--recipe", "int8", "--calib", cnn_calib, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "validation on cpu" in result.stdout and "SQNR dB" in result.stdout
    out = cnn_path.with_name("cnn.q.onnx")
    onnx.checker.check_model(onnx.load(out), full_check=True)
    assert sha(cnn_path) == before
    assert sorted(p.name for p in cnn_path.parent.iterdir() if p.is_file()) == [
        "calib.npz",
        "cnn.onnx",
        "cnn.q.onnx",
        "cnn.q.onnx.calib.json",
        "cnn.q.onnx.report.html",
        "cnn.q.onnx.report.json",
    ]
    assert list(workdir.iterdir()) == []
    report = json.loads(out.with_name("cnn.q.onnx.report.json").read_text())
    assert report["passed"] and report["validation"][0]["outputs"][0]["sqnr_db"] > 20
    assert json.loads(onnx.load(out).metadata_props[0].value)["name"] == "int8"


@pytest.mark.parametrize(
    ("recipe_text", "sets", "expected"),
    [
        ("calibraton: {num_samples: 4}\n", [], "unknown key 'calibraton'; did you mean 'calibration'?"),
        ("passes:\n  - simplfy: {}\n", [], "unknown pass 'simplfy'; did you mean 'simplify'?"),
        (None, ["calibration.num_samples=lots"], "'calibration.num_samples': input should be a valid integer"),
        (None, ["passes.insert_qdq.fuse_activation=false"], "did you mean 'fuse_activations'?"),
        ("passes: [\n", [], "is not valid YAML"),
    ],
)
def test_recipe_errors_exit_2_with_one_line(
    cnn_path: Path, cnn_calib: Path, workdir: Path, recipe_text: str | None, sets: list[str], expected: str
) -> None:
    recipe = "int8"
    if recipe_text is not None:
        recipe_path = workdir.parent / "bad.yaml"
        recipe_path.write_text(recipe_text)
        recipe = str(recipe_path)
    args = [arg for s in sets for arg in ("--set", s)]
    result = onnxq("run", cnn_path, "--recipe", recipe, "--calib", cnn_calib, *args, cwd=workdir)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not cnn_path.with_name("cnn.q.onnx").exists()


def test_bad_model_path_and_output_equal_to_input(cnn_path: Path, cnn_calib: Path, workdir: Path) -> None:
    missing = onnxq("run", workdir / "nope.onnx", cwd=workdir)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    same = onnxq("run", cnn_path, "--calib", cnn_calib, "-o", cnn_path, cwd=workdir)
    assert same.returncode == 2 and "is the input model" in same.stderr


def test_missing_calibration_data_says_how_to_give_it(cnn_path: Path, workdir: Path) -> None:
    result = onnxq("run", cnn_path, cwd=workdir)
    assert result.returncode == 2 and "--calib" in result.stderr
    assert not cnn_path.with_name("cnn.q.onnx").exists()


def test_failed_gate_exits_3_but_keeps_the_model(cnn_path: Path, cnn_calib: Path, workdir: Path) -> None:
    result = onnxq("run", cnn_path, "--calib", cnn_calib, "--set", "validate.gates.min_sqnr_db=200", cwd=workdir)
    assert result.returncode == 3
    assert "min_sqnr_db failed" in result.stderr
    assert "validation on cpu" in result.stdout  # what was measured is still shown
    assert cnn_path.with_name("cnn.q.onnx").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(cnn_path: Path, workdir: Path) -> None:
    result = onnxq("run", cnn_path, "--dry-run", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "per-node plan" in result.stdout and "Conv×4" in result.stdout
    assert sorted(p.name for p in cnn_path.parent.iterdir() if p.is_file()) == ["cnn.onnx"]


def test_inspect_passes_and_schema(cnn_path: Path, workdir: Path) -> None:
    inspect = onnxq("inspect", cnn_path, cwd=workdir)
    assert inspect.returncode == 0 and "BatchNormalization" in inspect.stdout
    passes = onnxq("passes", cwd=workdir)
    assert passes.returncode == 0
    for name in ("upgrade_opset", "simplify", "fold_batchnorm", "assign_precision", "insert_qdq", "cleanup"):
        assert name in passes.stdout
    schema = json.loads(onnxq("schema", cwd=workdir).stdout)
    assert set(schema["properties"]) >= {"calibration", "defaults", "passes", "validate", "output"}
    assert len(schema["properties"]["passes"]["items"]["anyOf"]) >= 6


def test_validate_command(cnn_path: Path, cnn_calib: Path, workdir: Path) -> None:
    assert onnxq("run", cnn_path, "--calib", cnn_calib, "--no-validate", cwd=workdir).returncode == 0
    quant = cnn_path.with_name("cnn.q.onnx")
    result = onnxq("validate", cnn_path, quant, "--data", cnn_calib, "--providers", "cpu,cuda", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "validation on cpu" in result.stdout
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "skipped: onnxruntime here has no CUDAExecutionProvider" in result.stdout


def test_method_and_workers_from_the_command_line(cnn_path: Path, cnn_calib: Path, workdir: Path) -> None:
    result = onnxq(
        "run",
        cnn_path,
        "--calib",
        cnn_calib,
        "--set",
        "calibration.method=percentile",
        "--workers",
        "2",
        "--no-validate",
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    bad = onnxq("run", cnn_path, "--calib", cnn_calib, "--set", "calibration.method=kl", cwd=workdir)
    assert bad.returncode == 2 and "calibration.method" in bad.stderr and "percentile" in bad.stderr


def test_validate_with_a_task_metric_localization_and_an_html_report(
    cnn_path: Path, cnn_calib: Path, workdir: Path
) -> None:
    assert onnxq("run", cnn_path, "--calib", cnn_calib, "--no-validate", cwd=workdir).returncode == 0
    quant = cnn_path.with_name("cnn.q.onnx")
    report = workdir / "report.html"
    args = ["--data", cnn_calib, "--metric", "onnxq.metrics:top1_agreement", "--localize", "always"]
    result = onnxq("validate", cnn_path, quant, *args, "--report", report, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "task metric: " in result.stdout and "where the error comes from" in result.stdout
    assert "integer kernels (cpu): " in result.stdout and "QLinearConv" in result.stdout
    data = json.loads(report.with_suffix(".json").read_text())
    assert data["validation"][0]["task_metric"] > 0.9 and data["localization"]["nodes"]
    assert "<svg" in report.read_text()
    failing = onnxq("validate", cnn_path, quant, *args[:4], "--min-task-metric", "1.01", cwd=workdir)
    assert failing.returncode == 3 and "min_task_metric" in failing.stderr
