"""lower_fp16 on small real graphs: checker (full), onnxruntime CPU sessions and SQNR against the fp32 model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import float_model
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from ort_util import run

from onnxq import ir as onnxq_ir
from onnxq import qmath, registry
from onnxq.pass_base import PassContext
from onnxq.passes.lower_fp16 import LowerFP16
from onnxq.qspec import NodeQuant, QuantSpec, get_qspec, set_qspec

FP16 = NodeQuant(activations=QuantSpec(dtype="fp16"), weights=QuantSpec(dtype="fp16"))
F32 = np.float32


def conv_chain(opset: int = 13, seed: int = 0) -> onnx.ModelProto:
    """x → Conv(+bias) → Relu → Conv → MatMul → y."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.normal(0, 0.3, (16, 3, 3, 3)).astype(F32),
        "b1": rng.normal(0, 0.1, 16).astype(F32),
        "w2": rng.normal(0, 0.1, (16, 16, 3, 3)).astype(F32),
        "w3": rng.normal(0, 0.3, (8, 64)).astype(F32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["c2", "w3"], ["y"], name="matmul"),
    ]
    return float_model(nodes, {"x": ["N", 3, 8, 8]}, {"y": ["N", 16, 8, 64]}, inits, opset)


def lower(proto: onnx.ModelProto, names: Iterable[str] | None = None) -> tuple[ir.Model, list[str]]:
    """Annotate `names` (all nodes when None) fp16 and run the pass; returns the model and the notes."""
    model = onnxq_ir.from_proto(proto)
    for node in model.graph:
        if names is None or node.name in names:
            set_qspec(node, FP16)
    context = PassContext()
    LowerFP16(context=context)(model)
    onnx.checker.check_model(onnxq_ir.to_proto(model), full_check=True)
    return model, context.notes


def ops(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph)


def sqnr(reference: onnx.ModelProto, model: ir.Model, feeds: dict[str, np.ndarray]) -> list[float]:
    return [
        qmath.sqnr_db(a, b) for a, b in zip(run(onnxq_ir.from_proto(reference), feeds), run(model, feeds), strict=True)
    ]


def cast_targets(model: ir.Model) -> list[tuple[str, int]]:
    return sorted((n.inputs[0].name, n.attributes["to"].value) for n in model.graph if n.op_type == "Cast")


def test_registered() -> None:
    assert registry.get("lower_fp16") is LowerFP16


@pytest.mark.parametrize("opset", [13, 17])
def test_whole_chain_runs_in_fp16_with_casts_only_at_its_edges(opset: int) -> None:
    proto = conv_chain(opset)
    model, notes = lower(proto)
    assert ops(model) == Counter({"Conv": 2, "Relu": 1, "MatMul": 1, "Cast": 2})
    assert cast_targets(model) == [("x", TensorProto.FLOAT16), ("y_fp16", TensorProto.FLOAT)]
    assert all(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values())
    assert sorted(model.graph.initializers) == ["b1_fp16", "w1_fp16", "w2_fp16", "w3_fp16"]
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [("y", ir.DataType.FLOAT)]
    assert model.graph.outputs[0].shape == ir.Shape(["N", 16, 8, 64])
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 8, 8)).astype(F32)
    (db,) = sqnr(proto, model, {"x": x})
    assert db > 50, db
    ratio = len(onnxq_ir.model_bytes(model)) / len(proto.SerializeToString())
    assert 0.45 < ratio < 0.6, ratio
    assert notes == [
        "lower_fp16: 4 nodes run in float16 (4 weights stored as fp16, 1 Casts in, 1 Casts out, "
        "0 weight values clipped to ±65504)"
    ]


def test_only_the_middle_node_gets_casts_around_it() -> None:
    proto = conv_chain()
    model, _ = lower(proto, ["conv2"])
    assert ops(model) == Counter({"Conv": 2, "Relu": 1, "MatMul": 1, "Cast": 2})
    assert cast_targets(model) == [("c2_fp16", TensorProto.FLOAT), ("r1", TensorProto.FLOAT16)]
    by_name = {n.name: n for n in model.graph}
    for name, ins, outs in [
        ("conv1", ["x", "w1", "b1"], ["c1"]),
        ("relu1", ["c1"], ["r1"]),
        ("matmul", ["c2", "w3"], ["y"]),
    ]:
        assert [v.name for v in by_name[name].inputs] == ins
        assert [v.name for v in by_name[name].outputs] == outs
        assert all(v.dtype == ir.DataType.FLOAT for v in by_name[name].outputs)
    assert [v.name for v in by_name["conv2"].inputs] == ["r1_fp16", "w2_fp16"]
    assert {k: v.dtype for k, v in model.graph.initializers.items()} == {
        "w1": ir.DataType.FLOAT,
        "b1": ir.DataType.FLOAT,
        "w2_fp16": ir.DataType.FLOAT16,
        "w3": ir.DataType.FLOAT,
    }
    x = np.random.default_rng(2).normal(0, 1, (2, 3, 8, 8)).astype(F32)
    (db,) = sqnr(proto, model, {"x": x})
    assert db > 50, db


def test_constant_node_weights_become_shared_fp16_initializers_and_clip_bounds_convert() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, (16, 16)).astype(F32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.array(-1.5, F32), "lo")),
        helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(np.array(1e5, F32), "hi")),
        helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"),
        helper.make_node("Clip", ["a", "lo", "hi"], ["c"], name="clip"),
        helper.make_node("MatMul", ["c", "w"], ["y"], name="mm2"),
    ]
    proto = float_model(nodes, {"x": [2, 16]}, {"y": [2, 16]}, {})
    model, notes = lower(proto)
    assert ops(model) == Counter({"MatMul": 2, "Clip": 1, "Cast": 2})  # the Constant nodes are gone
    assert {k: v.dtype for k, v in model.graph.initializers.items()} == dict.fromkeys(
        ["w_fp16", "lo_fp16", "hi_fp16"], ir.DataType.FLOAT16
    )
    mm1, clip, mm2 = (n for n in model.graph if n.op_type != "Cast")
    assert mm1.inputs[1] is mm2.inputs[1]  # one converted copy, shared
    assert [v.name for v in clip.inputs] == ["a_fp16", "lo_fp16", "hi_fp16"]
    assert model.graph.initializers["hi_fp16"].const_value.numpy() == np.float16(65504)
    assert "3 weights stored as fp16" in notes[0] and "1 weight values clipped to ±65504" in notes[0]
    x = rng.normal(0, 1, (2, 16)).astype(F32)
    (db,) = sqnr(proto, model, {"x": x})
    assert db > 50, db


def test_value_read_by_fp16_node_and_graph_output_stays_fp32_under_its_name() -> None:
    rng = np.random.default_rng(4)
    inits = {"b": rng.normal(0, 1, 8).astype(F32), **{k: rng.normal(0, 0.3, (8, 8)).astype(F32) for k in ("w1", "w2")}}
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="add"),
        helper.make_node("MatMul", ["a", "w1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2"),
    ]
    proto = float_model(nodes, {"x": [3, 8]}, {"a": [3, 8], "h": [3, 8], "y": [3, 8]}, inits)
    model, _ = lower(proto, ["mm1", "mm2"])
    assert [(v.name, v.dtype) for v in model.graph.outputs] == [(k, ir.DataType.FLOAT) for k in ("a", "h", "y")]
    assert [v.producer().op_type for v in model.graph.outputs] == ["Add", "Cast", "Cast"]
    assert model.graph.outputs[0].producer().name == "add"
    mm2 = next(n for n in model.graph if n.name == "mm2")
    assert mm2.inputs[0].name == "h_fp16" and mm2.inputs[0].producer().name == "mm1"  # no fp32 bounce
    assert ops(model)["Cast"] == 3
    x = rng.normal(0, 1, (3, 8)).astype(F32)
    dbs = sqnr(proto, model, {"x": x})
    assert dbs[0] == float("inf") and min(dbs[1:]) > 50, dbs


def test_annotated_ops_without_fp16_lowering_stay_fp32_and_are_noted() -> None:
    rng = np.random.default_rng(5)
    inits = {
        "w": rng.normal(0, 0.3, (4, 4)).astype(F32),
        "roi": np.zeros(0, F32),
        "scales": np.array([1, 1, 2, 2], F32),
        "shape": np.array([1, 1, 16, 4], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Exp", ["m"], ["e"], name="exp"),
        helper.make_node("Resize", ["e", "roi", "scales"], ["r"], name="resize"),
        helper.make_node("Reshape", ["r", "shape"], ["y"], name="reshape"),
    ]
    proto = float_model(nodes, {"x": [1, 1, 4, 4]}, {"y": [1, 1, 16, 4]}, inits)
    model, notes = lower(proto)
    by_name = {n.name: n for n in model.graph}
    assert all(by_name[n].outputs[0].dtype != ir.DataType.FLOAT16 for n in ("exp", "resize"))
    assert [v.name for v in by_name["exp"].inputs] == ["m"]
    assert [v.name for v in by_name["resize"].inputs] == ["e", "roi", "scales"]
    assert [v.name for v in by_name["reshape"].inputs] == ["r_fp16", "shape"]
    assert model.graph.initializers["shape"].dtype == ir.DataType.INT64
    assert notes[0].endswith("; 2 annotated fp16 left in fp32 (op or input types not lowered: Exp×1, Resize×1)")
    x = rng.normal(0, 1, (1, 1, 4, 4)).astype(F32)
    (db,) = sqnr(proto, model, {"x": x})
    assert db > 50, db


def test_second_run_changes_nothing() -> None:
    model, _ = lower(conv_chain(), ["conv1", "relu1", "matmul"])
    before = onnxq_ir.to_proto(model).SerializeToString(deterministic=True)
    assert all(get_qspec(n) is None for n in model.graph if n.op_type == "Cast")
    context = PassContext()
    assert not LowerFP16(context=context)(model).modified
    assert onnxq_ir.to_proto(model).SerializeToString(deterministic=True) == before
    assert context.notes == [
        "lower_fp16: 0 nodes run in float16 (0 weights stored as fp16, 0 Casts in, 0 Casts out, "
        "0 weight values clipped to ±65504)"
    ]


def five_node_chain(seed: int) -> onnx.ModelProto:
    """x → Conv → Clip → Reshape → MatMul → LayerNormalization → y (opset 17)."""
    rng = np.random.default_rng(seed)
    inits = {
        "w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(F32),
        "b": rng.normal(0, 0.1, 4).astype(F32),
        "lo": np.array(-1.0, F32),
        "hi": np.array(2.0, F32),
        "shape": np.array([0, 4, 36], np.int64),
        "wm": rng.normal(0, 0.2, (36, 16)).astype(F32),
        "gamma": rng.uniform(0.5, 1.5, 16).astype(F32),
        "beta": rng.normal(0, 0.1, 16).astype(F32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="n0", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["k"], name="n1"),
        helper.make_node("Reshape", ["k", "shape"], ["r"], name="n2"),
        helper.make_node("MatMul", ["r", "wm"], ["m"], name="n3"),
        helper.make_node("LayerNormalization", ["m", "gamma", "beta"], ["y"], name="n4", axis=-1),
    ]
    return float_model(nodes, {"x": ["N", 3, 6, 6]}, {"y": ["N", 4, 16]}, inits, opset=17)


@settings(derandomize=True, max_examples=50, deadline=None)
@given(chosen=st.lists(st.booleans(), min_size=5, max_size=5), seed=st.integers(0, 1000))
def test_any_subset_of_a_chain_lowers_cleanly(chosen: list[bool], seed: int) -> None:
    proto = five_node_chain(seed)
    names = [f"n{i}" for i, c in enumerate(chosen) if c]
    model, _ = lower(proto, names)  # full checker inside
    lowered = [n for n in model.graph if n.name in names]
    assert all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in lowered)
    # one Cast per fp16 run's entry and exit: runs of adjacent fp16 nodes share them
    runs = sum(1 for i, c in enumerate(chosen) if c and (i == 0 or not chosen[i - 1]))
    assert ops(model)["Cast"] == 2 * runs
    x = np.random.default_rng(seed).normal(0, 1, (2, 3, 6, 6)).astype(F32)
    (db,) = sqnr(proto, model, {"x": x})
    assert db > 40, db
