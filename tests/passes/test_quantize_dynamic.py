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


def test_an_lstm_becomes_dynamic_quantize_lstm_at_a_quarter_of_the_size(tmp_path: Path) -> None:
    """onnxruntime's DynamicQuantizeLSTM, as its own quantize_dynamic makes it: int8 W and R, run-time x/h."""
    from builders import stacked_lstm
    from onnxruntime.quantization import quantize_dynamic

    source = tmp_path / "lstm.onnx"
    onnx.save(stacked_lstm(layers=2, features=64, hidden=128, classes=16), source)
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((1, 20, 64)).astype(np.float32),
        "h0": (0.5 * rng.standard_normal((2, 1, 128))).astype(np.float32),
        "c0": np.zeros((2, 1, 128), np.float32),
    }
    np.savez(tmp_path / "eval.npz", **{k: v[None] for k, v in feeds.items()})  # one feed, stacked
    result = onnxq.run(source, "int8-dynamic", data=str(tmp_path / "eval.npz"), output=tmp_path / "q.onnx")
    ops = optimized_op_counts(result.output)
    assert ops["DynamicQuantizeLSTM"] == 2 and ops.get("LSTM", 0) == 0, ops
    assert result.sizes["output_bytes"] <= 0.3 * result.sizes["input_bytes"]
    quantize_dynamic(str(source), str(tmp_path / "ort.onnx"))
    reference = run(source, feeds)
    ours, theirs = run(result.output, feeds), run(tmp_path / "ort.onnx", feeds)
    for ref, got, peer in zip(reference, ours, theirs, strict=True):  # y, hn, cn
        assert qmath.sqnr_db(ref, got) > 30
        assert qmath.sqnr_db(ref, got) >= qmath.sqnr_db(ref, peer) - 1.0
