from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import cnn_data, small_cnn, tiny_transformer, transformer_data
from ort_util import run

from onnxq import ir as onnxq_ir
from onnxq import qmath
from onnxq.passes import Simplify, UpgradeOpset


def test_weights_in_constant_nodes_become_initializers() -> None:
    proto = small_cnn(weights_as_constants=True)
    model = onnxq_ir.from_proto(proto)
    assert sum(n.op_type == "Constant" for n in model.graph) == 12
    Simplify()(model)
    assert sum(n.op_type == "Constant" for n in model.graph) == 0
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[1].const_value is not None
    x = cnn_data(8)
    assert qmath.sqnr_db(run(proto, {"x": x})[0], run(model, {"x": x})[0]) > 100


def test_simplify_keeps_batchnorm_for_fold_batchnorm() -> None:
    model = onnxq_ir.from_proto(small_cnn())
    Simplify()(model)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph) == 1


def test_upgrade_from_opset_11_runs_and_never_downgrades() -> None:
    proto = small_cnn(opset=11)
    model = onnxq_ir.from_proto(proto)
    assert UpgradeOpset(target=13)(model).modified
    assert model.opset_imports[""] == 13
    x = cnn_data(8)
    np.testing.assert_allclose(run(proto, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert not UpgradeOpset(target=12)(model).modified
    assert model.opset_imports[""] == 13


def test_batched_matmul_add_is_not_wrapped_in_reshapes() -> None:
    """onnxsim's batched MatMul+Add → Gemm fusion adds Reshape/Shape/Concat around every transformer
    projection (MiniLM: +60 nodes, ~8% slower in onnxruntime); simplify must leave the pair alone."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
    ]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = onnxq_ir.from_proto(proto)
    Simplify()(model)
    assert sorted(n.op_type for n in model.graph) == ["Add", "MatMul"]


def _reduce_model(opset: int) -> onnx.ModelProto:
    """x → ReduceMean over the last axis (axes an attribute before 18, an input from 18) → Relu."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1], keepdims=1),
            helper.make_node("Relu", ["m"], ["y"]),
        ],
        "reduce",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    return proto


def test_upgrade_is_an_import_bump_only_where_every_op_keeps_its_meaning() -> None:
    """17 → 21 on a graph without Reduce ops needs no rewrite; with ReduceMean, axes must become an input."""
    plain = onnxq_ir.from_proto(tiny_transformer(opset=17))
    before = [(n.op_type, len(n.inputs)) for n in plain.graph]
    UpgradeOpset(target=21)(plain)
    assert plain.opset_imports[""] == 21 and [(n.op_type, len(n.inputs)) for n in plain.graph] == before
    x = transformer_data(2, seed=0)
    np.testing.assert_allclose(run(tiny_transformer(opset=17), {"x": x})[0], run(plain, {"x": x})[0], rtol=1e-6)

    proto = _reduce_model(17)
    reduce = onnxq_ir.from_proto(proto)
    UpgradeOpset(target=21)(reduce)
    mean = next(n for n in reduce.graph if n.op_type == "ReduceMean")
    assert len(mean.inputs) == 2 and "axes" not in mean.attributes  # converted, not just re-stamped
    x = np.arange(10, dtype=np.float32).reshape(2, 5) - 4
    np.testing.assert_allclose(run(proto, {"x": x})[0], run(reduce, {"x": x})[0])


def test_equal_split_gets_num_outputs_across_opset_18() -> None:
    """Found by the random-graph fuzzer (int4-weight upgrades to 21): an equal Split with no sizes is invalid
    from opset 18 unless it names num_outputs."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (4, 2, 1, 1)).astype(np.float32)
    nodes = [
        onnx.helper.make_node("Split", ["x"], ["a", "b"], axis=1),
        onnx.helper.make_node("Conv", ["a", "w"], ["ca"]),
        onnx.helper.make_node("Conv", ["b", "w"], ["cb"]),
        onnx.helper.make_node("Add", ["ca", "cb"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "split",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4, 5, 5])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 5, 5])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    proto.ir_version = 7
    upgraded = UpgradeOpset(target=21)(onnxq_ir.from_proto(proto)).model
    out = onnxq_ir.to_proto(upgraded)
    onnx.checker.check_model(out, full_check=True)
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert onnx.helper.get_attribute_value(next(a for a in split.attribute if a.name == "num_outputs")) == 2
    x = rng.normal(size=(2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(run(proto, {"x": x})[0], run(out, {"x": x})[0])


def _gelu_projection(order: str) -> onnx.ModelProto:
    """MatMul + bias + exact GELU with its factors in the order an exporter wrote them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    consts = {
        "w": rng.standard_normal((8, 16)).astype(np.float32),
        "b": rng.standard_normal(16).astype(np.float32),
        "sqrt2": np.array(np.sqrt(2.0), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    make = helper.make_node
    nodes = [
        make("MatMul", ["x", "w"], ["xw"]),
        make("Add", ["xw", "b"], ["h"]),
        make("Div", ["h", "sqrt2"], ["d"]),
        make("Erf", ["d"], ["e"]),
        make("Add", ["e", "one"], ["e1"]),
    ]
    nodes += {
        "torch": [make("Mul", ["half", "e1"], ["m"]), make("Mul", ["h", "m"], ["y"])],  # x · (0.5 · E)
        "late_half": [make("Mul", ["h", "e1"], ["m"]), make("Mul", ["m", "half"], ["y"])],  # (x · E) · 0.5
        "fusable": [make("Mul", ["h", "half"], ["m"]), make("Mul", ["m", "e1"], ["y"])],  # (x · 0.5) · E
    }[order]
    graph = helper.make_graph(
        nodes,
        "gelu_projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        initializer=[numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def _run_unoptimized(model, feeds):  # type: ignore[no-untyped-def]
    """The graph exactly as written: onnxruntime's own fusions would compute GELU differently."""
    import onnxruntime as ort
    from ort_util import as_bytes

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(as_bytes(model), options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("order", ["torch", "late_half", "fusable"])
def test_exact_gelu_is_reordered_so_onnxruntime_fuses_it_with_its_bias(order: str) -> None:
    from ort_util import optimized_model

    proto = _gelu_projection(order)
    model = onnxq_ir.from_proto(proto)
    Simplify()(model)
    x = np.random.default_rng(2).standard_normal((2, 5, 8)).astype(np.float32) * 3
    np.testing.assert_array_equal(_run_unoptimized(proto, {"x": x})[0], _run_unoptimized(model, {"x": x})[0])
    fused = [n.op_type for n in optimized_model(model).graph.node]
    assert fused == ["MatMul", "BiasGelu"], fused
    as_exported = [n.op_type for n in optimized_model(proto).graph.node]
    assert ("Erf" in as_exported) == (order == "torch")  # only torch's order needs the rewrite


def test_a_gelu_intermediate_read_elsewhere_is_left_alone() -> None:
    proto = _gelu_projection("torch")
    proto.graph.output.append(onnx.helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, None))
    model = onnxq_ir.from_proto(proto)
    Simplify()(model)
    x = np.random.default_rng(3).standard_normal((1, 4, 8)).astype(np.float32)
    for a, b in zip(_run_unoptimized(proto, {"x": x}), _run_unoptimized(model, {"x": x}), strict=True):
        np.testing.assert_array_equal(a, b)


def test_two_dimensional_matmul_and_bias_become_a_gemm_that_lowers_to_qgemm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime fuses a 2-D MatMul + bias into a float Gemm at load time; behind Q/DQ that Gemm then
    runs in float on weights dequantized every run. As a Gemm before lowering it becomes QGemm."""
    from onnx import TensorProto, helper, numpy_helper
    from ort_util import optimized_model

    import onnxq

    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="head"), helper.make_node("Add", ["xw", "b"], ["y"])],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            numpy_helper.from_array((rng.standard_normal((64, 10)) * 0.1).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal((1, 10)).astype(np.float32), "b"),
        ],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 7
    model = onnxq_ir.from_proto(proto)
    Simplify()(model)
    assert [(n.op_type, n.name) for n in model.graph] == [("Gemm", "head")]
    assert [v.name for v in model.graph.outputs] == ["y"]
    x = rng.standard_normal((16, 64)).astype(np.float32)
    np.testing.assert_allclose(run(proto, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)

    onnx.save(proto, tmp_path / "head.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    out = onnxq.run(tmp_path / "head.onnx", "int8", calib=str(tmp_path / "calib.npz"), validate=False).output
    assert [n.op_type for n in optimized_model(out).graph.node] == ["QuantizeLinear", "QGemm"]
    assert qmath.sqnr_db(run(proto, {"x": x})[0], run(out, {"x": x})[0]) > 30


def test_a_matmul_on_three_dimensional_input_keeps_its_add() -> None:
    proto = _gelu_projection("fusable")  # [batch, seq, 8] · [8, 16] + b
    model = onnxq_ir.from_proto(proto)
    Simplify()(model)
    assert "Gemm" not in [n.op_type for n in model.graph]


def test_weights_read_through_identity_are_quantized(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """torch's legacy exporter deduplicates equal initializers (two all-zero biases) and reads the copy
    through an Identity; with the Identity removed both Gemms become MatMulNBits, and the output is exact."""
    import onnxq

    helper, rng = onnx.helper, np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((32, 32)).astype(np.float32) / 6 for _ in range(2))
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["zeros"], ["zeros_copy"]),
            helper.make_node("Gemm", ["x", "w1", "zeros"], ["h"], transB=1),
            helper.make_node("Gemm", ["h", "w2", "zeros_copy"], ["y"], transB=1),
        ],
        "shared_bias",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
        [
            onnx.numpy_helper.from_array(w1, "w1"),
            onnx.numpy_helper.from_array(w2, "w2"),
            onnx.numpy_helper.from_array(np.zeros(32, np.float32), "zeros"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    x = rng.standard_normal((8, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = onnxq.run(tmp_path / "m.onnx", "int4-weight", calib=str(tmp_path / "calib.npz"), output=tmp_path / "q.onnx")
    ops = [n.op_type for n in onnx.load(str(out.output)).graph.node]
    assert ops.count("MatMulNBits") == 2 and "Identity" not in ops, ops
    (reference,), (quantized,) = run(str(tmp_path / "m.onnx"), {"x": x}), run(str(out.output), {"x": x})
    assert qmath.sqnr_db(reference, quantized) > 15
