"""Small ONNX graphs built with onnx.helper for tests: real graphs, random weights, run by onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def small_cnn(
    opset: int = 13, seed: int = 0, weights_as_constants: bool = False, batch: str | int = "N"
) -> onnx.ModelProto:
    """Conv+BN+Relu → two branches → Concat → MaxPool → Conv+Relu → GlobalAveragePool → Flatten → Gemm."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = {
        "w1": rng.normal(0, 0.4, (8, 1, 3, 3)).astype(f32),
        "b1": rng.normal(0, 0.1, 8).astype(f32),
        "bn_s": rng.uniform(0.5, 1.5, 8).astype(f32),
        "bn_b": rng.normal(0, 0.1, 8).astype(f32),
        "bn_m": rng.normal(0, 0.1, 8).astype(f32),
        "bn_v": rng.uniform(0.5, 1.5, 8).astype(f32),
        "wa": rng.normal(0, 0.2, (8, 8, 3, 3)).astype(f32),
        "wb": rng.normal(0, 0.3, (8, 8, 1, 1)).astype(f32),
        "w2": rng.normal(0, 0.15, (16, 16, 3, 3)).astype(f32),
        "b2": rng.normal(0, 0.1, 16).astype(f32),
        "wfc": rng.normal(0, 0.3, (10, 16)).astype(f32),
        "bfc": rng.normal(0, 0.1, 10).astype(f32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wa"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["r1", "wb"], ["cb"], name="conv_b"),
        helper.make_node("Concat", ["ra", "cb"], ["cat"], name="concat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["mp", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], name="fc", transB=1),
    ]
    initializers = []
    if weights_as_constants:
        consts = [helper.make_node("Constant", [], [k], name=f"const_{k}", value=_init(k, v)) for k, v in inits.items()]
        nodes = consts + nodes
    else:
        initializers = [_init(k, v) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset >= 13 else 6
    onnx.checker.check_model(model)
    return model


def cnn_data(n: int = 64, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)
    return (base * (rng.uniform(0, 1, (n, 1, 1, 1)) > 0.2)).astype(np.float32)


def float_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list],
    outputs: dict[str, list],
    initializers: dict[str, np.ndarray],
    opset: int = 13,
) -> onnx.ModelProto:
    """A checked model with float inputs/outputs of the given (symbolic) shapes, at an IR version onnxruntime takes."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        initializer=[_init(n, a) for n, a in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    return model
