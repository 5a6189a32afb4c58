"""Half-precision models (as onnxruntime's own float16 converter writes them) quantize like float32 ones, keep
their fp16 interface, and what stays float is stored in fp16 again."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import cnn_data, if_model, small_cnn, tiny_transformer, transformer_data
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16
from ort_util import optimized_model, run

import onnxq
from onnxq import ir as onnxq_ir
from onnxq.passes import UpcastFP16
from onnxq.qmath import sqnr_db

HALF = TensorProto.FLOAT16


def _half(model: onnx.ModelProto) -> onnx.ModelProto:
    return convert_float_to_float16(model, keep_io_types=False)


def _io_types(path: Path | str) -> list[int]:
    graph = onnx.load(str(path)).graph
    return [v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)]


def _quantize(tmp_path: Path, model: onnx.ModelProto, x: np.ndarray, recipe: str) -> tuple[Path, Path]:
    source, calib = tmp_path / "half.onnx", tmp_path / "calib.npz"
    onnx.save(model, source)
    np.savez(calib, x=x)
    out = onnxq.run(source, recipe, calib=str(calib), output=tmp_path / f"{recipe}.onnx", validate=False).output
    return source, Path(out)


def test_a_float16_cnn_gets_integer_convs_and_keeps_its_float16_interface(tmp_path: Path) -> None:
    x = cnn_data(32).astype(np.float16)
    source, out = _quantize(tmp_path, _half(small_cnn()), x, "int8")
    before = source.read_bytes()
    ops = collections.Counter(n.op_type for n in optimized_model(out).graph.node)
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 1, ops
    assert _io_types(out) == _io_types(source) == [HALF, HALF]
    (reference,), (quantized,) = run(source, {"x": x}), run(out, {"x": x})
    assert quantized.dtype == np.float16
    assert sqnr_db(reference.astype(np.float32), quantized.astype(np.float32)) > 25
    assert source.read_bytes() == before


def test_weight_only_on_a_float16_transformer_stores_the_float_rest_in_float16(tmp_path: Path) -> None:
    """MatMulNBits for every weight MatMul/Gemm; LayerNorm parameters and other float constants stay fp16 on
    disk (through a Cast onnxruntime folds), so the file shrinks instead of doubling what was not quantized.
    MatMulNBits' own scales and bias must have the activations' type, float32."""
    x = transformer_data(16, seed=3).astype(np.float16)
    source, out = _quantize(tmp_path, _half(tiny_transformer()), x, "int4-weight")
    graph = onnx.load(str(out)).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["MatMulNBits"] == 6, ops
    kernel_inputs = {name for n in graph.node if n.op_type == "MatMulNBits" for name in n.input}
    big = [t for t in graph.initializer if np.prod(t.dims) >= 16 and t.data_type in (TensorProto.FLOAT, HALF)]
    assert [t.name for t in big if t.data_type == TensorProto.FLOAT and t.name not in kernel_inputs] == []
    assert sum(t.data_type == HALF for t in big) >= 2  # gamma and beta at least
    assert out.stat().st_size < 0.6 * source.stat().st_size
    (reference,), (quantized,) = run(source, {"x": x}), run(out, {"x": x})
    assert sqnr_db(reference.astype(np.float32), quantized.astype(np.float32)) > 20


def test_upcasting_alone_changes_only_the_arithmetic_precision(tmp_path: Path) -> None:
    """Inside a float16 model with an If, every type and constant becomes float32 (subgraphs too); the
    outputs move only by float16 rounding, and a float32 model is left untouched."""
    half = _half(if_model())
    model = UpcastFP16()(onnxq_ir.from_proto(half)).model
    proto = onnxq_ir.to_proto(model)
    inner = next(n for n in proto.graph.node if n.op_type == "If")
    branch_types = {
        t.data_type for attr in inner.attribute for n in attr.g.node for a in n.attribute if a.t.dims for t in [a.t]
    } | {t.data_type for attr in inner.attribute for t in attr.g.initializer}
    assert HALF not in branch_types
    assert [v.type.tensor_type.elem_type for v in proto.graph.input] == [HALF]
    assert all(v.type.tensor_type.elem_type == HALF for v in proto.graph.output)
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float16)
    for a, b in zip(run(half, {"x": x}), run(proto, {"x": x}), strict=True):
        assert a.dtype == b.dtype == np.float16
        assert sqnr_db(a.astype(np.float32), b.astype(np.float32)) > 45
    assert not UpcastFP16()(onnxq_ir.from_proto(small_cnn())).modified


def test_bfloat16_weights_and_constants_upcast_exactly() -> None:
    """A bf16 model (Constant-node weight, Cast targets) computes in float32 with the same weights bit for
    bit, and its bf16 input and output stay bf16."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    w_bf16 = helper.make_tensor("w", TensorProto.BFLOAT16, w.shape, w.ravel().tolist())
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w_out"], value=w_bf16),
            helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["x32"], ["xb"], to=TensorProto.BFLOAT16),
            helper.make_node("MatMul", ["xb", "w_out"], ["y"]),
        ],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    proto = onnxq_ir.to_proto(UpcastFP16()(onnxq_ir.from_proto(model)).model)
    constant = next(n for n in proto.graph.node if n.op_type == "Constant")
    stored = numpy_helper.to_array(constant.attribute[0].t)
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, numpy_helper.to_array(w_bf16).astype(np.float32))
    casts = [a.i for n in proto.graph.node if n.op_type == "Cast" for a in n.attribute]
    assert casts.count(TensorProto.BFLOAT16) == 1  # only the one that writes the bf16 output
    assert _io_types_of(proto) == [TensorProto.BFLOAT16, TensorProto.BFLOAT16]
    onnx.checker.check_model(proto, full_check=True)


def _io_types_of(proto: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)]


@pytest.mark.parametrize("recipe", ["int8-dynamic", "mixed"])
def test_other_recipes_on_a_float16_model_run_in_onnxruntime(tmp_path: Path, recipe: str) -> None:
    x = cnn_data(16).astype(np.float16)
    source, out = _quantize(tmp_path, _half(small_cnn()), x, recipe)
    (reference,), (quantized,) = run(source, {"x": x}), run(out, {"x": x})
    assert _io_types(out) == [HALF, HALF]
    assert sqnr_db(reference.astype(np.float32), quantized.astype(np.float32)) > 20
