"""The stats cache: a rerun with the same model, settings and data skips onnxruntime calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import cnn_data

import onnxq
from onnxq.errors import UsageError


def _run(cnn_path: Path, calib: Path | None, out: Path, *sets: str, stats: Path | None = None):
    return onnxq.run(
        cnn_path,
        "int8",
        calib=str(calib) if calib else None,
        output=out,
        overrides=list(sets),
        validate=False,
        stats=stats,
    )


def test_rerun_reuses_statistics_and_writes_the_same_bytes(cnn_path: Path, cnn_calib: Path, tmp_path: Path) -> None:
    first = _run(cnn_path, cnn_calib, tmp_path / "a.onnx")
    assert first.calibration_seconds > 0
    assert (tmp_path / "a.onnx.calib.json").exists()
    second = _run(cnn_path, cnn_calib, tmp_path / "a.onnx")
    assert second.calibration_seconds == 0.0  # onnxruntime never ran
    assert any("reused" in note for note in second.notes)
    third = _run(cnn_path, cnn_calib, tmp_path / "b.onnx", stats=tmp_path / "a.onnx.calib.json")
    assert third.calibration_seconds == 0.0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("change", ["method", "data"])
def test_other_settings_or_data_miss_the_cache(cnn_path: Path, cnn_calib: Path, tmp_path: Path, change: str) -> None:
    _run(cnn_path, cnn_calib, tmp_path / "a.onnx")
    if change == "method":
        again = _run(cnn_path, cnn_calib, tmp_path / "a.onnx", "calibration.method=percentile")
    else:
        other = tmp_path / "other.npz"
        np.savez(other, x=cnn_data(seed=9))
        again = _run(cnn_path, other, tmp_path / "a.onnx")
    assert again.calibration_seconds > 0


def test_explicit_stats_work_without_data(cnn_path: Path, cnn_calib: Path, tmp_path: Path) -> None:
    _run(cnn_path, cnn_calib, tmp_path / "a.onnx")
    result = _run(cnn_path, None, tmp_path / "b.onnx", stats=tmp_path / "a.onnx.calib.json")
    assert result.calibration_seconds == 0.0


def test_missing_explicit_stats_file_is_a_clear_error(cnn_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        _run(cnn_path, None, tmp_path / "b.onnx", stats=tmp_path / "nope.calib.json")
