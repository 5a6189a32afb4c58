"""Which kernels onnxruntime runs for Conv→Clip (ReLU6) and ConvTranspose after int8, counted in the optimized
graph, and that the realization check names what stays on a float kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from ort_util import optimized_op_counts

import onnxq


def _model(kind: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 2, 2)).astype(np.float32), "wt"),
        numpy_helper.from_array(np.zeros(8, np.float32), "b"),
        numpy_helper.from_array(np.array(0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6, np.float32), "hi"),
    ]
    if kind == "relu6":
        nodes = [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
        ]
        shape = ["N", 8, 8, 8]
    else:
        nodes = [
            helper.make_node("ConvTranspose", ["x", "wt", "b"], ["c"], strides=[2, 2]),
            helper.make_node("Relu", ["c"], ["y"]),
        ]
        shape = ["N", 8, 16, 16]
    graph = helper.make_graph(
        nodes,
        kind,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _quantize(tmp_path: Path, kind: str):  # type: ignore[no-untyped-def]
    source, data = tmp_path / f"{kind}.onnx", tmp_path / "x.npz"
    onnx.save(_model(kind), source)
    np.savez(data, x=np.random.default_rng(1).normal(0, 1, (16, 4, 8, 8)).astype(np.float32))
    return onnxq.run(source, "int8", calib=str(data), data=str(data), output=tmp_path / f"{kind}.q.onnx")


def test_conv_relu6_runs_as_one_qlinearconv(tmp_path: Path) -> None:
    result = _quantize(tmp_path, "relu6")
    ops = optimized_op_counts(result.output)
    assert ops["QLinearConv"] == 1
    assert ops["Clip"] == 0 and ops["Conv"] == 0 and ops["FusedConv"] == 0  # the Clip went into the Q's range
    (cpu,) = result.realization
    assert cpu["integer_kernels"] == {"QLinearConv": 1} and not cpu["fallbacks"]


def test_conv_transpose_float_kernel_is_reported(tmp_path: Path) -> None:
    """onnxruntime 1.32 has no integer ConvTranspose kernel on its CPU provider:
    the op runs in float between DQ and Q, and the realization check says so instead of staying silent."""
    result = _quantize(tmp_path, "transpose")
    ops = optimized_op_counts(result.output)
    assert ops["ConvTranspose"] == 1 and ops["QLinearConv"] == 0
    (cpu,) = result.realization
    (fallback,) = cpu["fallbacks"]
    assert fallback["op_type"] == "ConvTranspose" and "no integer ConvTranspose kernel" in fallback["reason"]
