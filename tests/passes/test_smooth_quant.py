"""SmoothQuant: exact in float, flatter activations, better int8 on inputs with outlier channels."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from ort_util import run

import onnxq
from onnxq import ir as onnxq_ir
from onnxq import qmath
from onnxq.pass_base import PassContext
from onnxq.passes import SmoothQuant

K = 16


def _data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4, K)).astype(np.float32)
    x[..., 3] *= 60.0  # the outlier channels LLM activations are known for
    x[..., 11] *= 25.0
    return x


def _model(layernorm: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (K, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, K)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b2"),
    ]
    nodes = []
    x = "x"
    if layernorm:
        gamma = np.ones(K, np.float32)
        gamma[3], gamma[11] = 60.0, 25.0
        inits += [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(np.zeros(K, np.float32), "beta")]
        nodes.append(helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1))
        x = "ln"
    nodes += [
        helper.make_node("MatMul", [x, "w1"], ["a"]),
        helper.make_node("Reshape", [x, "shape"], ["x2"]),
        helper.make_node("Gemm", ["x2", "w2", "b2"], ["g"], transB=1),
    ]
    inits.append(numpy_helper.from_array(np.array([-1, K], np.int64), "shape"))
    graph = helper.make_graph(
        nodes,
        "sq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, K])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4, 8]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, ["M", 8]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _smooth(proto: onnx.ModelProto, x: np.ndarray):  # type: ignore[no-untyped-def]
    model = onnxq_ir.from_proto(proto)
    SmoothQuant(context=PassContext(calibration_data=lambda: iter([{"x": x}])))(model)
    return model


def test_smoothing_is_exact_in_float_and_inserts_a_mul_per_activation() -> None:
    proto, x = _model(layernorm=False), _data(32, 0)
    model = _smooth(proto, x)
    ops = collections.Counter(n.op_type for n in model.graph)
    # x (read by MatMul and by the Reshape that stays unscaled) and x2 (read by Gemm): one Mul each
    assert ops["Mul"] == 2
    for ref, got in zip(run(proto, {"x": x}), run(model, {"x": x}), strict=True):
        assert qmath.sqnr_db(ref, got) > 70


def test_layernorm_fold_when_only_weights_read_it() -> None:
    proto = _model(layernorm=True)
    del proto.graph.node[2:]  # keep LN → MatMul only
    proto.graph.output.pop()
    x = _data(32, 0) / 50
    model = _smooth(proto, x)
    assert "Mul" not in {n.op_type for n in model.graph}
    ln = next(n for n in model.graph if n.op_type == "LayerNormalization")
    gamma = ln.inputs[1].const_value.numpy()
    assert gamma[3] < 60.0  # the outlier moved from the activation into the MatMul weight
    (ref,), (got,) = run(proto, {"x": x}), run(model, {"x": x})
    assert qmath.sqnr_db(ref, got) > 70


def test_int8_with_smoothquant_beats_without(tmp_path: Path) -> None:
    proto = _model(layernorm=False)
    path, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(proto, path)
    np.savez(calib, x=_data(64, 1))
    x = _data(64, 2)
    scores = {}
    for smooth in (False, True):
        passes = ([{"smooth_quant": {"alpha": 0.5}}] if smooth else []) + [{"assign_precision": {}}, {"insert_qdq": {}}]
        recipe = {"calibration": {"num_samples": 64}, "passes": passes}
        out = onnxq.run(path, recipe, calib=str(calib), output=tmp_path / f"q{smooth}.onnx", validate=False).output
        scores[smooth] = qmath.sqnr_db(run(proto, {"x": x})[0], run(out, {"x": x})[0])
    assert scores[True] > scores[False] + 3, scores  # measured: 28.4 → 36.8 dB (first output)


def test_ignored_readers_keep_their_input_unsmoothed() -> None:
    proto, x = _model(layernorm=False), _data(32, 0)
    model = onnxq_ir.from_proto(proto)
    context = PassContext(calibration_data=lambda: iter([{"x": x}]))
    SmoothQuant({"ignore": [{"op_types": ["Gemm"]}]}, context=context)(model)
    muls = [n for n in model.graph if n.op_type == "Mul"]
    assert len(muls) == 1 and muls[0].inputs[0].name == "x"  # only the MatMul's input was smoothed
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert gemm.inputs[1].name == "w2"
