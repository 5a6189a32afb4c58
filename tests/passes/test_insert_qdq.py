"""Lowering: exact node counts, the placement onnxruntime fuses, and accuracy on a real session."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from builders import cnn_data, float_model, small_cnn
from ort_util import optimized_op_counts, run

from onnxq import ir as onnxq_ir
from onnxq import qmath
from onnxq.calibration.readers import open_data
from onnxq.errors import MissingPrerequisite, OnnxqError
from onnxq.pass_base import PassContext
from onnxq.passes import AssignPrecision, FoldBatchNorm, InsertQDQ


def _quantize(proto, **config):
    model = onnxq_ir.from_proto(proto)
    data = cnn_data(64)
    context = PassContext(calibration_data=lambda: iter([{"x": data}]))
    FoldBatchNorm(context=context)(model)
    AssignPrecision(context=context)(model)
    InsertQDQ(config, context=context)(model)
    return model


def test_small_cnn_gets_exact_qdq_layout_and_fuses_into_integer_kernels() -> None:
    model = _quantize(small_cnn())
    ops = collections.Counter(n.op_type for n in model.graph)
    # activations: x, relu1, relu_a, conv_b, concat, maxpool (own input scale), relu2, flatten; the Gemm's
    # output (logits) stays float: no quantized op reads it and QGemm has a float-output form
    assert ops["QuantizeLinear"] == 8
    # 8 activation DQs + 5 weights + 3 biases (conv1 after BN folding, conv2, fc)
    assert ops["DequantizeLinear"] == 16
    fused = optimized_op_counts(model)
    assert fused["QLinearConv"] == 4
    assert fused["QGemm"] == 1
    assert fused["QLinearConcat"] == 1
    assert fused["FusedConv"] == 0 and fused["Conv"] == 0  # no conv left in float


def test_quantized_cnn_stays_close_to_float() -> None:
    proto = small_cnn()
    model = _quantize(proto)
    x = cnn_data(128, seed=7)
    (ref,) = run(proto, {"x": x})
    (got,) = run(model, {"x": x})
    assert qmath.sqnr_db(ref, got) > 20
    assert qmath.top1_agreement(ref, got) > 0.9


def test_weights_are_int8_per_channel_and_bias_int32() -> None:
    model = _quantize(small_cnn())
    conv = next(n for n in model.graph if n.name == "conv2")
    weight_dq = conv.inputs[1].producer()
    assert weight_dq.op_type == "DequantizeLinear"
    assert weight_dq.attributes.get_int("axis") == 0
    assert weight_dq.inputs[0].const_value.numpy().dtype == np.int8
    assert weight_dq.inputs[1].const_value.numpy().shape == (16,)
    bias_dq = conv.inputs[2].producer()
    assert bias_dq.inputs[0].const_value.numpy().dtype == np.int32
    x_scale = conv.inputs[0].producer().inputs[1].const_value.numpy()
    np.testing.assert_allclose(
        bias_dq.inputs[1].const_value.numpy(), x_scale * weight_dq.inputs[1].const_value.numpy(), rtol=1e-6
    )


def test_shared_concat_scale_groups_inputs_and_output() -> None:
    model = _quantize(small_cnn(), share_concat_scale=True)
    concat = next(n for n in model.graph if n.op_type == "Concat")
    scales = {v.producer().inputs[1].name for v in concat.inputs}
    assert len(scales) == 1
    quant = next(iter(concat.outputs[0].uses())).node
    assert quant.op_type == "QuantizeLinear" and quant.inputs[1].name in scales


def test_graph_output_name_is_kept_and_reads_the_dequantized_value() -> None:
    model = _quantize(small_cnn(), float_output_ops=[])
    (output,) = model.graph.outputs
    assert output.name == "logits"
    assert output.producer().op_type == "DequantizeLinear"


def test_gemm_output_read_by_no_quantized_op_stays_float() -> None:
    model = _quantize(small_cnn())
    (output,) = model.graph.outputs
    assert output.name == "logits" and output.producer().op_type == "Gemm"


def test_per_channel_on_old_opset_is_refused_with_the_fix() -> None:
    with pytest.raises(OnnxqError, match="upgrade_opset"):
        _quantize(small_cnn(opset=12))


def test_missing_calibration_data_names_the_fix() -> None:
    model = onnxq_ir.from_proto(small_cnn())
    AssignPrecision()(model)
    with pytest.raises(OnnxqError, match="--calib"):
        InsertQDQ()(model)


def test_insert_qdq_without_annotations_says_what_to_run_first() -> None:
    model = onnxq_ir.from_proto(small_cnn())
    with pytest.raises(MissingPrerequisite, match="assign_precision"):
        InsertQDQ(context=PassContext(calibration_data=lambda: iter(open_data("synthetic", [])())))(model)


def test_fused_integer_kernels_match_qdq_reference_semantics() -> None:
    """With the default 7-bit weights, onnxruntime's integer kernels cannot saturate: the fused graph
    computes what the Q/DQ graph means (without reduce_range, an AVX2 CPU loses ~12 dB here)."""
    import onnxruntime as ort

    model = _quantize(small_cnn())
    x = cnn_data(64, seed=3)
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(onnxq_ir.model_bytes(model), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x})[0])
    assert qmath.sqnr_db(outputs[0], outputs[1]) > 35


def test_model_with_nothing_to_quantize_is_left_valid() -> None:
    """Regression (found by the random-graph test): a lone Sigmoid has no target op; not an error."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model = onnxq_ir.from_proto(proto)
    context = PassContext(calibration_data=lambda: iter([{"x": np.ones((2, 4), np.float32)}]))
    AssignPrecision(context=context)(model)
    assert not InsertQDQ(context=context)(model).modified
    assert "nothing left to quantize" in context.notes[-1]


def _gemm_after_scaling(factor: float):
    """x·factor → Gemm with a large bias: the Gemm input range is zero (factor 0) or tiny."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = {
        "k": np.array(factor, np.float32),
        "w": rng.normal(0, 0.5, (3, 8)).astype(np.float32),
        "b": np.array([1.5, -0.7, 0.2], np.float32),
    }
    nodes = [helper.make_node("Mul", ["x", "k"], ["xs"]), helper.make_node("Gemm", ["xs", "w", "b"], ["y"], transB=1)]
    return float_model(nodes, {"x": ["N", 8]}, {"y": ["N", 3]}, inits)


@pytest.mark.parametrize("factor", [0.0, 1e-9])
def test_bias_never_overflows_int32_when_the_input_range_is_zero_or_tiny(factor: float) -> None:
    """Regression (random-graph test): a dead input made s_x·s_w tiny and the int32 bias wrap around."""
    proto = _gemm_after_scaling(factor)
    model = onnxq_ir.from_proto(proto)
    x = np.random.default_rng(1).uniform(-1, 1, (16, 8)).astype(np.float32)
    context = PassContext(calibration_data=lambda: iter([{"x": x}]))
    AssignPrecision(context=context)(model)
    InsertQDQ(context=context)(model)
    (ref,) = run(proto, {"x": x})
    (got,) = run(model, {"x": x})
    assert qmath.sqnr_db(ref, got) > 30
    fused = optimized_op_counts(model)
    assert fused["QGemm"] == 1
