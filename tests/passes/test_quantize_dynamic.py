"""quantize_dynamic: no calibration, fused by onnxruntime, at least as accurate as its quantize_dynamic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from builders import float_model
from onnx import helper
from ort_util import optimized_op_counts, run

import onnxq
from onnxq import qmath


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = {
        "w1": rng.normal(0, 0.15, (64, 96)).astype(np.float32),
        "w2": rng.normal(0, 0.15, (32, 96)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 32).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    return float_model(nodes, {"x": ["N", 64]}, {"y": ["N", 32]}, inits)


def test_int8_dynamic_needs_no_data_fuses_and_beats_onnxruntime_per_channel(tmp_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = _mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(proto, path)
    result = onnxq.run(path, "int8-dynamic", output=tmp_path / "q.onnx", validate=False)  # no --calib
    assert result.calibration_seconds == 0.0
    fused = optimized_op_counts(result.output)
    assert fused["DynamicQuantizeMatMul"] == 2 and fused["MatMul"] + fused["Gemm"] == 0
    # the same granularity as ours; its full 8-bit columns saturate int16 pair sums on CPUs without VNNI
    quantize_dynamic(str(path), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    (ref,) = run(proto, {"x": x})
    ours = qmath.sqnr_db(ref, run(result.output, {"x": x})[0])
    theirs = qmath.sqnr_db(ref, run(tmp_path / "ort.onnx", {"x": x})[0])
    assert ours > 30 and ours >= theirs, (ours, theirs)
    assert result.model.graph.outputs[0].name == "y"
