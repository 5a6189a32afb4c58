"""onnxq passes plug into a user's own onnx-ir PassManager, next to onnx-ir's own passes."""

from __future__ import annotations

import collections

import onnx
import onnx_ir as ir
from builders import cnn_data, small_cnn
from onnx_ir.passes.common import CheckerPass, TopologicalSortPass
from ort_util import run

from onnxq import apply, qmath
from onnxq import ir as onnxq_ir
from onnxq.pass_base import PassContext
from onnxq.passes import AssignPrecision, Cleanup, FoldBatchNorm, InsertQDQ, Simplify


def test_users_pass_manager_runs_onnxq_passes() -> None:
    proto = small_cnn(weights_as_constants=True)
    model = onnxq_ir.from_proto(proto)
    x = cnn_data(32)
    context = PassContext(calibration_data=lambda: iter([{"x": x}]))
    manager = ir.passes.PassManager(
        [
            Simplify(context=context),
            FoldBatchNorm(context=context),
            AssignPrecision(context=context),
            InsertQDQ(context=context),
            Cleanup(context=context),
            TopologicalSortPass(),
        ],
        steps=1,
    )
    result = manager(model)
    assert result.modified and result.model is model
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] == 8 and ops["Constant"] == 0 and ops["BatchNormalization"] == 0
    CheckerPass(full_check=True)(model)
    assert qmath.sqnr_db(run(proto, {"x": x})[0], run(model, {"x": x})[0]) > 20


def test_apply_serves_modelproto_users() -> None:
    proto = small_cnn()
    out = apply(FoldBatchNorm(), proto)
    assert isinstance(out, onnx.ModelProto)
    assert all(n.op_type != "BatchNormalization" for n in out.graph.node)
    assert any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # the caller's proto is untouched
