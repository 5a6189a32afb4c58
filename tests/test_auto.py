"""auto: candidates run through the same runner and are scored on held-out calibration feeds; the fastest
that meets the gates is kept, every candidate is reported, and bad settings are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from conftest import DIGITS

import onnxq
from onnxq.errors import UsageError


def test_auto_reports_every_candidate_and_keeps_one_that_meets_the_gates(tmp_path: Path) -> None:
    model = tmp_path / "digits.onnx"
    shutil.copy(DIGITS / "digits_cnn.onnx", model)
    result = onnxq.run(model, "auto", calib=str(DIGITS / "calib.npz"), data=str(DIGITS / "eval.npz"))
    found = result.artifacts["auto"]
    labels = [c["label"] for c in found["candidates"]]
    assert labels[:4] == ["int8 minmax", "int8 percentile", "int8 mse", "int8 entropy"]
    assert "mixed int8/fp32" not in labels  # an int8 candidate met the gates: mixed cannot be faster
    chosen = next(c for c in found["candidates"] if c["label"] == found["chosen"])
    assert chosen["meets"] and chosen["speedup"] > 0
    assert result.passed and result.validation[0].accuracy_quantized > 0.95  # type: ignore[operator]
    report = json.loads(result.report_path.read_text())  # type: ignore[union-attr]
    assert report["auto"]["chosen"] == found["chosen"]
    assert onnx.load(str(result.output)).graph.node  # the final model, re-run on all the calibration data
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits.onnx",
        "digits.q.onnx",
        "digits.q.onnx.calib.json",
        "digits.q.onnx.report.html",
        "digits.q.onnx.report.json",
    ]  # no candidate or held-out folder left behind


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"overrides": ["auto.max_minuets=3"]}, "unknown setting 'auto.max_minuets'"),
        ({"overrides": ["auto.max_minutes=soon"]}, "takes a number"),
        ({"calib": None}, "auto needs calibration data"),
        ({"dry_run": True}, "no dry run"),
    ],
)
def test_bad_auto_settings_are_one_line_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    model = tmp_path / "digits.onnx"
    shutil.copy(DIGITS / "digits_cnn.onnx", model)
    args = {"calib": str(DIGITS / "calib.npz"), **kwargs}
    with pytest.raises(UsageError, match=message):
        onnxq.run(model, "auto", **args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.onnx"]
