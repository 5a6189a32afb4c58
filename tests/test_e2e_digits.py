"""The main job on the bundled model: the README's first command, checked end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
from conftest import DIGITS

import onnxq


def test_int8_digits_keeps_accuracy_within_half_a_point(tmp_path: Path) -> None:
    model = tmp_path / "digits_cnn.onnx"
    shutil.copy(DIGITS / "digits_cnn.onnx", model)
    result = onnxq.run(model, "int8", calib=str(DIGITS / "calib.npz"), data=str(DIGITS / "eval.npz"))
    (validation,) = result.validation
    assert validation.samples == 540
    assert abs(validation.accuracy_float - validation.accuracy_quantized) <= 0.005
    assert validation.accuracy_float > 0.97
    assert validation.outputs[0].sqnr_db > 20
    onnx.checker.check_model(onnx.load(result.output), full_check=True)
    ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(result.output).graph.node}
    assert "BatchNormalization" not in ops and "QuantizeLinear" in ops
