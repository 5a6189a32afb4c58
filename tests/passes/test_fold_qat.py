"""fold_qat on the forms training leaves behind (hand-built here; real torch exports in test_qat_fold.py):
weight Q→DQ becomes integer storage, decomposed fake quantization becomes Q/DQ, a sidecar's learned scales
are applied, equal DQ→Q pairs vanish, and a second run (or the int8 recipe) changes nothing."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from builders import cnn_data, small_cnn
from onnx import TensorProto, helper, numpy_helper
from ort_util import run

import onnxq
from onnxq import ir as onnxq_ir
from onnxq import qmath
from onnxq.passes import FoldQAT


def _fake_quant_conv(decomposed: bool) -> onnx.ModelProto:
    """x → fake-quant(uint8) → Conv(fake-quant int8 per-channel weight) → y, as training exports it."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(axis=1) / 127).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(0.02, np.float32), "x_s"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_z"),
        numpy_helper.from_array(w_scale, "w_s"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_z"),
    ]
    if decomposed:  # x / s → Round → + z → Clip(0, 255) → − z → · s, with float constants
        inits += [
            numpy_helper.from_array(np.array(0.02, np.float32), "s"),
            numpy_helper.from_array(np.array(128.0, np.float32), "z"),
            numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
            numpy_helper.from_array(np.array(255.0, np.float32), "hi"),
        ]
        act = [
            helper.make_node("Div", ["x", "s"], ["d"]),
            helper.make_node("Round", ["d"], ["r"]),
            helper.make_node("Add", ["r", "z"], ["a"]),
            helper.make_node("Clip", ["a", "lo", "hi"], ["c"]),
            helper.make_node("Sub", ["c", "z"], ["u"]),
            helper.make_node("Mul", ["u", "s"], ["x_fq"]),
        ]
    else:
        act = [
            helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_s", "x_z"], ["x_fq"]),
        ]
    nodes = [
        *act,
        helper.make_node("QuantizeLinear", ["w", "w_s", "w_z"], ["w_q"], axis=0),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_fq"], axis=0),
        helper.make_node("Conv", ["x_fq", "w_fq"], ["y"], pads=[1, 1, 1, 1], name="conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "qat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _x() -> np.ndarray:
    return np.random.default_rng(1).uniform(-2, 2, (3, 2, 6, 6)).astype(np.float32)


def test_weight_quantize_becomes_integer_storage_exactly() -> None:
    proto = _fake_quant_conv(decomposed=False)
    model = onnxq_ir.from_proto(proto)
    assert FoldQAT()(model).modified
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 2  # the activation's pair stays
    conv = next(n for n in model.graph if n.op_type == "Conv")
    weight_dq = conv.inputs[1].producer()
    assert weight_dq.op_type == "DequantizeLinear" and weight_dq.inputs[0].const_value.dtype == ir.DataType.INT8
    assert not any(v.const_value.dtype.name == "FLOAT" and len(v.shape) == 4 for v in model.graph.initializers.values())
    np.testing.assert_array_equal(run(proto, {"x": _x()})[0], run(model, {"x": _x()})[0])


def test_decomposed_fake_quant_is_restored_to_qdq() -> None:
    proto = _fake_quant_conv(decomposed=True)
    model = onnxq_ir.from_proto(proto)
    FoldQAT()(model)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert {op: ops[op] for op in ("Div", "Round", "Clip", "Mul", "QuantizeLinear", "DequantizeLinear")} == {
        "Div": 0,
        "Round": 0,
        "Clip": 0,
        "Mul": 0,
        "QuantizeLinear": 1,
        "DequantizeLinear": 2,
    }
    reference = run(proto, {"x": _x()})[0]
    assert qmath.sqnr_db(reference, run(model, {"x": _x()})[0]) > 80  # same rounding, same result


def test_fold_qat_twice_and_int8_after_it_change_nothing(tmp_path: Path) -> None:
    source = tmp_path / "qat.onnx"
    onnx.save(_fake_quant_conv(decomposed=True), source)
    np.savez(tmp_path / "calib.npz", x=_x())
    once = onnxq.run(source, "qat", calib=str(tmp_path / "calib.npz"), output=tmp_path / "once.onnx", validate=False)
    again = onnxq.run(once.output, {"passes": [{"fold_qat": {}}]}, output=tmp_path / "again.onnx", validate=False)
    assert [p.modified for p in again.passes] == [False]
    twice = onnxq.run(
        once.output, "int8", calib=str(tmp_path / "calib.npz"), output=tmp_path / "int8.onnx", validate=False
    )
    ops_once = collections.Counter(n.op_type for n in onnx.load(once.output).graph.node)
    ops_twice = collections.Counter(n.op_type for n in onnx.load(twice.output).graph.node)
    assert ops_twice["QuantizeLinear"] == ops_once["QuantizeLinear"]  # no doubled Q/DQ
    assert qmath.sqnr_db(run(once.output, {"x": _x()})[0], run(twice.output, {"x": _x()})[0]) >= 60


def test_int8_on_an_int8_model_is_the_identity(tmp_path: Path) -> None:
    source = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), source)
    np.savez(tmp_path / "calib.npz", x=cnn_data(16))
    first = onnxq.run(source, "int8", calib=str(tmp_path / "calib.npz"), output=tmp_path / "q1.onnx", validate=False)
    second = onnxq.run(
        first.output, "int8", calib=str(tmp_path / "calib.npz"), output=tmp_path / "q2.onnx", validate=False
    )
    onnx.checker.check_model(onnx.load(second.output), full_check=True)
    count = [collections.Counter(n.op_type for n in onnx.load(p).graph.node) for p in (first.output, second.output)]
    assert count[0] == count[1]
    x = cnn_data(8, seed=3)
    assert qmath.sqnr_db(run(first.output, {"x": x})[0], run(second.output, {"x": x})[0]) >= 60


def test_sidecar_scales_are_applied_and_frozen(tmp_path: Path) -> None:
    proto = _fake_quant_conv(decomposed=False)
    # the float form a learned-step-size training leaves: no Q/DQ in the graph, scales in a JSON beside it
    plain = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
        "lsq",
        list(proto.graph.input),
        list(proto.graph.output),
        initializer=[i for i in proto.graph.initializer if i.name == "w"],
    )
    model_proto = helper.make_model(plain, opset_imports=[helper.make_opsetid("", 13)])
    model_proto.ir_version = 7
    w_scale = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w_s"))
    sidecar = tmp_path / "scales.json"
    sidecar.write_text(
        json.dumps(
            {
                "tensors": {
                    "x": {"scale": 0.02, "zero_point": 128, "bits": 8, "signed": False, "axis": None},
                    "w": {"scale": w_scale.tolist(), "zero_point": 0, "bits": 8, "signed": True, "axis": 0},
                }
            }
        )
    )
    model = onnxq_ir.from_proto(model_proto)
    FoldQAT(sidecar=str(sidecar))(model)
    np.testing.assert_array_equal(run(proto, {"x": _x()})[0], run(model, {"x": _x()})[0])  # = the Q/DQ export
    (bad := tmp_path / "bad.json").write_text(json.dumps({"tensors": {"nope": {"scale": 1.0}}}))
    try:
        FoldQAT(sidecar=str(bad))(onnxq_ir.from_proto(model_proto))
    except onnxq.errors.UsageError as exc:
        assert "nope" in str(exc)
    else:
        raise AssertionError("an unknown sidecar name must be a clear error")
