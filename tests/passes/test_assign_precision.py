"""assign_precision: defaults on target ops, rules in order (later wins), regex selectors, ignore."""

from __future__ import annotations

import numpy as np
from builders import small_cnn

from onnxq import ir as onnxq_ir
from onnxq.cpu import int8_pairs_saturate
from onnxq.pass_base import PassContext
from onnxq.passes import AssignPrecision
from onnxq.qspec import NodeQuant, QuantSpec, get_qspec


def _specs(**config) -> dict[str, NodeQuant | None]:
    model = onnxq_ir.from_proto(small_cnn())
    AssignPrecision(config)(model)
    return {n.name: get_qspec(n) for n in model.graph}


def test_defaults_cover_compute_and_data_movement_ops_only() -> None:
    specs = _specs()
    annotated = sorted(name for name, spec in specs.items() if spec is not None)
    assert annotated == ["concat", "conv1", "conv2", "conv_a", "conv_b", "fc", "flatten", "pool"]
    saturating = int8_pairs_saturate()  # `reduce_range: auto`: 7-bit weights only where kernels need them
    assert specs["conv1"].weights == QuantSpec(
        dtype="int8", granularity="channel", symmetric=True, reduce_range=saturating
    )
    assert specs["conv1"].activations.dtype == "uint8"


def test_later_rules_override_earlier_fields() -> None:
    specs = _specs(
        rules=[
            {"op_types": ["Conv"], "activations": {"dtype": "int8", "symmetric": True}},
            {"names": ["re:^conv_[ab]$"], "skip": True},
            {"names": ["conv_b"], "skip": False},
        ]
    )
    assert specs["conv1"].activations.dtype == "int8"
    assert specs["conv_a"].skip and not specs["conv_b"].skip
    assert specs["conv_b"].activations.dtype == "int8"


def test_rules_can_add_ops_outside_the_targets_and_ignore_wins() -> None:
    specs = _specs(rules=[{"op_types": ["GlobalAveragePool"]}], ignore=[{"names": ["fc"]}])
    assert specs["gap"] is not None and not specs["gap"].skip
    assert specs["fc"].skip


def test_context_defaults_are_used() -> None:
    model = onnxq_ir.from_proto(small_cnn())
    weights = QuantSpec(dtype="int8", granularity="tensor", symmetric=True)
    AssignPrecision(context=PassContext(defaults=NodeQuant(weights=weights)))(model)
    assert get_qspec(next(n for n in model.graph if n.name == "fc")).weights.granularity == "tensor"


def test_frozen_annotations_are_never_overwritten() -> None:
    model = onnxq_ir.from_proto(small_cnn())
    conv = next(n for n in model.graph if n.name == "conv1")
    frozen = NodeQuant(activations=QuantSpec(dtype="int8", symmetric=True), frozen_by="qat")
    conv.meta["onnxq.qspec"] = frozen
    AssignPrecision(rules=[{"op_types": ["Conv"], "skip": True}])(model)
    assert get_qspec(conv) == frozen


def test_has_weight_tells_weight_matmuls_from_activation_matmuls() -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
            helper.make_node("MatMul", ["y", "x"], ["z"], name="qk"),
        ],
        "attention-like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])],
        initializer=[w],
    )
    model = onnxq_ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    AssignPrecision(targets=["MatMul"], ignore=[{"op_types": ["MatMul"], "has_weight": False}])(model)
    specs = {n.name: get_qspec(n) for n in model.graph}
    assert not specs["proj"].skip and specs["qk"].skip
