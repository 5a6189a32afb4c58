from __future__ import annotations

import onnx_ir as ir
from builders import cnn_data, small_cnn
from ort_util import run

from onnxq import ir as onnxq_ir
from onnxq import qmath
from onnxq.passes import FoldBatchNorm


def test_folding_removes_every_batchnorm_and_keeps_outputs() -> None:
    proto = small_cnn()
    model = onnxq_ir.from_proto(proto)
    result = FoldBatchNorm()(model)
    assert result.modified
    assert [n.op_type for n in model.graph].count("BatchNormalization") == 0
    x = cnn_data(16)
    (before,) = run(proto, {"x": x})
    (after,) = run(model, {"x": x})
    assert qmath.sqnr_db(before, after) > 100


def test_batchnorm_whose_conv_output_has_other_uses_is_left_alone() -> None:
    proto = small_cnn()
    proto.graph.output.append(onnx_value_info("c1"))
    model = onnxq_ir.from_proto(proto)
    assert not FoldBatchNorm()(model).modified
    assert [n.op_type for n in model.graph].count("BatchNormalization") == 1


def onnx_value_info(name: str):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def test_graph_output_name_survives_when_batchnorm_produced_it() -> None:
    proto = small_cnn()
    model = onnxq_ir.from_proto(proto)
    conv = next(n for n in model.graph if n.name == "conv1")
    bn = next(n for n in model.graph if n.op_type == "BatchNormalization")
    # Make the BN output a graph output: its name must be kept after folding.
    model.graph.outputs.append(bn.outputs[0])
    FoldBatchNorm()(model)
    assert "bn1" in [v.name for v in model.graph.outputs]
    assert conv.outputs[0].name == "bn1"
    assert isinstance(model, ir.Model)
