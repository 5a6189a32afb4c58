"""Random valid CNN/MLP graphs through the int8 recipe: checker passes, onnxruntime runs, SQNR above a floor."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from ort_util import run

import onnxq
from onnxq import qmath


class _Builder:
    def __init__(self, draw, rng: np.random.Generator) -> None:
        self.draw, self.rng = draw, rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def weight(self, shape: tuple[int, ...], scale: float) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(self.rng.normal(0, scale, shape).astype(np.float32), name))
        return name

    def constant(self, array: np.ndarray) -> str:
        name = self.name("k")
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int) -> str:
        inputs = [x, self.weight((cout, cin, k, k), 1.0 / np.sqrt(cin * k * k))]
        if self.draw(st.booleans()):
            inputs.append(self.weight((cout,), 0.1))
        return self.node("Conv", inputs, pads=[k // 2] * 4)


KINDS = [
    "conv",
    "conv_relu",
    "concat",
    "residual",
    "pool",
    "mul",
    "sigmoid",
    "transpose",
    "reshape",
    "resize",
    "split",
    "slice",
]


@st.composite
def random_model(draw) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    b = _Builder(draw, rng)
    c, hw = draw(st.integers(1, 4)), draw(st.sampled_from([4, 6, 8]))
    hw0 = hw
    x, channels = "x", c
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(KINDS))
        if kind in ("conv", "conv_relu"):
            cout = draw(st.integers(2, 8))
            x = b.conv(x, channels, cout, draw(st.sampled_from([1, 3])))
            channels = cout
            if kind == "conv_relu":
                x = b.node("Relu", [x])
        elif kind == "concat":
            left = b.node("Relu", [b.conv(x, channels, 4, 3)])
            right = b.conv(x, channels, 3, 1)
            x, channels = b.node("Concat", [left, right], axis=1), 7
        elif kind == "residual":
            x = b.node("Add", [x, b.conv(x, channels, channels, 3)])
        elif kind == "pool" and hw % 2 == 0:
            x, hw = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), hw // 2
        elif kind == "mul":
            x = b.node("Mul", [x, b.weight((1, channels, 1, 1), 1.0)])
        elif kind == "sigmoid":
            x = b.node("Sigmoid", [x])
        elif kind == "transpose":  # swaps H and W (square maps keep their shape)
            x = b.node("Transpose", [x], perm=[0, 1, 3, 2])
        elif kind == "reshape":  # [N, C, H, W] → [N, C, H·W] → back
            flat = b.node("Reshape", [x, b.constant(np.array([0, channels, hw * hw], np.int64))])
            x = b.node("Reshape", [b.node("Relu", [flat]), b.constant(np.array([0, channels, hw, hw], np.int64))])
        elif kind == "resize" and hw <= 4:  # nearest ×2 up, then a stride-2 conv back down
            up = b.node(
                "Resize",
                [x, b.constant(np.zeros(0, np.float32)), b.constant(np.array([1, 1, 2, 2], np.float32))],
                mode="nearest",
            )
            x = b.node("Conv", [up, b.weight((channels, channels, 2, 2), 0.5 / channels)], strides=[2, 2])
        elif kind == "split" and channels % 2 == 0:
            half = channels // 2
            first, second = b.name("split"), b.name("split")
            b.nodes.append(helper.make_node("Split", [x], [first, second], name=b.name("Split"), axis=1))
            x = b.node("Add", [b.conv(first, half, channels, 1), b.conv(second, half, channels, 3)])
        elif kind == "slice" and hw >= 4:  # crop one border row and column, pad back with a conv
            starts, ends, axes = ([1, 1], [hw - 1, hw - 1], [2, 3])
            cropped = b.node("Slice", [x, *(b.constant(np.array(v, np.int64)) for v in (starts, ends, axes))])
            x = b.node("Conv", [cropped, b.weight((channels, channels, 3, 3), 0.3 / channels)], pads=[2, 2, 2, 2])
    head = draw(st.sampled_from(["gemm", "matmul", "none"]))
    if head != "none":
        flat = b.node("Flatten", [x])
        features = channels * hw * hw
        if head == "gemm":
            x = b.node("Gemm", [flat, b.weight((5, features), 1 / np.sqrt(features)), b.weight((5,), 0.1)], transB=1)
        else:
            x = b.node("MatMul", [flat, b.weight((features, 5), 1 / np.sqrt(features))])
    out_shape = ["N", 5] if head != "none" else ["N", channels, hw, hw]
    opset = draw(st.sampled_from([11, 12, 13, 15, 17]))
    graph = helper.make_graph(
        b.nodes,
        "random",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, hw0, hw0])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, out_shape)],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model, (c, hw0)


# ONNXQ_FUZZ_EXAMPLES=1000 for a longer local run; CI runs 200 fixed (derandomized) examples.
@settings(
    max_examples=int(os.environ.get("ONNXQ_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(random_model())
def test_random_graphs_quantize_run_and_stay_close(
    tmp_path: Path, case: tuple[onnx.ModelProto, tuple[int, int]]
) -> None:
    model, (c, hw) = case
    rng = np.random.default_rng(0)
    calib = rng.uniform(-1, 1, (32, c, hw, hw)).astype(np.float32)
    path, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, path)
    np.savez(data, x=calib)
    result = onnxq.run(path, "int8", calib=str(data), output=tmp_path / "m.q.onnx", validate=False)
    quantized = onnx.load(result.output)
    onnx.checker.check_model(quantized, full_check=True)
    x = rng.uniform(-1, 1, (16, c, hw, hw)).astype(np.float32)
    (ref,) = run(model, {"x": x})
    (got,) = run(result.output, {"x": x})
    assert got.shape == ref.shape
    assert qmath.sqnr_db(ref, got) > 12


# Weight-only int4 (GPTQ, MatMulNBits) and the mixed-precision search on the same random graphs. The mixed
# run measures with few samples (its search, not its statistics, is what is under test here).
MIXED_FAST = [
    "passes.mixed_precision.objective=bitops",
    "passes.mixed_precision.samples=4",
    "passes.mixed_precision.target_samples=16",
    "calibration.method=minmax",
]
FLOORS = {"int4-weight": 10.0, "mixed": 8.0}  # mixed: a 20 dB target met on 16 samples


@settings(
    max_examples=int(os.environ.get("ONNXQ_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(random_model(), st.sampled_from(["int4-weight", "mixed"]))
def test_random_graphs_through_weight_only_and_mixed(
    tmp_path: Path, case: tuple[onnx.ModelProto, tuple[int, int]], recipe: str
) -> None:
    model, (c, hw) = case
    rng = np.random.default_rng(0)
    path, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, path)
    np.savez(data, x=rng.uniform(-1, 1, (16, c, hw, hw)).astype(np.float32))
    overrides = [*MIXED_FAST, "calibration.num_samples=16"] if recipe == "mixed" else ["calibration.num_samples=16"]
    result = onnxq.run(path, recipe, calib=str(data), output=tmp_path / "m.q.onnx", validate=False, overrides=overrides)
    quantized = onnx.load(result.output)
    onnx.checker.check_model(quantized, full_check=recipe != "int4-weight")  # MatMulNBits: a contrib op
    x = rng.uniform(-1, 1, (8, c, hw, hw)).astype(np.float32)
    (ref,) = run(model, {"x": x})
    (got,) = run(result.output, {"x": x})
    assert got.shape == ref.shape
    assert qmath.sqnr_db(ref, got) > FLOORS[recipe]
