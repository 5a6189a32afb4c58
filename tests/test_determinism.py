"""The same model, recipe and data give a byte-identical file on a rerun (in a fresh folder, so no
statistics cache is shared): reviews, caches and reproducible builds depend on it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import onnxq

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "models" / "digits"
CASES = {
    "int8 minmax": (DIGITS / "digits_cnn.onnx", "int8", str(DIGITS / "calib.npz"), []),
    "int8 entropy": (DIGITS / "digits_cnn.onnx", "int8", str(DIGITS / "calib.npz"), ["calibration.method=entropy"]),
    "int4-weight gptq": (
        REPO / "models" / "tinygpt" / "tinygpt.onnx",
        "int4-weight",
        "models.tinygpt:calibration_feeds",
        ["calibration.num_samples=8"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rerun_is_byte_identical(tmp_path: Path, case: str) -> None:
    model, recipe, calib, overrides = CASES[case]
    digests = []
    for run in ("first", "second"):
        folder = tmp_path / run
        folder.mkdir()
        out = onnxq.run(
            model, recipe, calib=calib, output=folder / "q.onnx", overrides=overrides, validate=False
        ).output
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
