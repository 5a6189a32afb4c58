"""to_matmul_nbits / from_matmul_nbits: bit-exact both ways, and the same outputs in onnxruntime."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from ort_util import as_bytes, optimized_op_counts

from onnxq import ir as onnxq_ir
from onnxq.errors import UsageError
from onnxq.pass_base import PassContext
from onnxq.passes.matmul_nbits import FromMatMulNBits, ToMatMulNBits

STORAGE = {
    "int2": ml_dtypes.int2,
    "uint2": ml_dtypes.uint2,
    "int4": ml_dtypes.int4,
    "uint4": ml_dtypes.uint4,
    "int8": np.int8,
    "uint8": np.uint8,
}


def block_quantize(
    w: np.ndarray, block_size: int, dtype: str, scale_dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per block of `block_size` rows along K: symmetric absmax/qmax for signed types (no zero point),
    (max − min)/qmax with a zero point for unsigned ones."""
    k, n = w.shape
    bits = int(dtype[-1])
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), np.float32)
    padded[:k] = w
    view = padded.reshape(blocks, block_size, n)
    rows = np.repeat(np.arange(blocks), block_size)[:k]
    if dtype.startswith("int"):
        qmax = 2 ** (bits - 1) - 1
        scale = (np.abs(view).max(axis=1) / qmax).astype(scale_dtype)
        q = np.clip(np.rint(w / scale[rows].astype(np.float32)), -qmax - 1, qmax)
        return q.astype(STORAGE[dtype]), scale, None
    qmax = 2**bits - 1
    lo, hi = np.minimum(view.min(axis=1), 0), np.maximum(view.max(axis=1), 0)
    scale = ((hi - lo) / qmax).astype(scale_dtype)
    zero = np.clip(np.rint(-lo / scale.astype(np.float32)), 0, qmax)
    q = np.clip(np.rint(w / scale[rows].astype(np.float32)) + zero[rows], 0, qmax)
    return q.astype(STORAGE[dtype]), scale, zero.astype(STORAGE[dtype])


def _const(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def dq_model(
    k: int,
    n: int,
    block_size: int,
    dtype: str,
    *,
    rank: int = 2,
    float_type: type = np.float32,
    bias: bool = False,
    seed: int = 0,
    opset: int = 21,
) -> ir.Model:
    """x [M, K] (or [B, S, K]) → DequantizeLinear(block) → MatMul [→ Add bias] → y, opset 21."""
    rng = np.random.default_rng(seed)
    q, scale, zero = block_quantize(rng.normal(0, 0.2, (k, n)).astype(np.float32), block_size, dtype, float_type)
    elem = ir.DataType.from_numpy(np.dtype(float_type))
    x = ir.Value(name="x", shape=ir.Shape(["M", k] if rank == 2 else ["B", "S", k]), type=ir.TensorType(elem))
    consts = [_const("w_q", q), _const("w_scale", scale)] + ([] if zero is None else [_const("w_zero", zero)])
    dq = ir.node("DequantizeLinear", consts, attributes={"axis": 0, "block_size": block_size}, name="dq")
    mm = ir.node("MatMul", [x, dq.outputs[0]], name="mm")
    nodes, out = [dq, mm], mm.outputs[0]
    if bias:
        b = _const("b", rng.normal(0, 0.1, n).astype(float_type))
        consts.append(b)
        add = ir.node("Add", [b, out], name="add")  # bias first: the pass must find it on either side
        nodes.append(add)
        out = add.outputs[0]
    out.name, out.dtype, out.shape = "y", elem, ir.Shape(["M", n] if rank == 2 else ["B", "S", n])
    graph = ir.Graph([x], [out], nodes=nodes, initializers=consts, opset_imports={"": opset}, name="g")
    return ir.Model(graph, ir_version=10)


def session(model: ir.Model, *, optimize: bool = True, dq_accuracy: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if dq_accuracy is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(dq_accuracy))
    return ort.InferenceSession(as_bytes(model), options, providers=["CPUExecutionProvider"])


def op_types(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in model.graph)


def initializer(model: ir.Model, consumer: str, index: int) -> np.ndarray | None:
    node = next(n for n in model.graph if n.op_type == consumer)
    value = node.inputs[index] if index < len(node.inputs) else None
    return None if value is None else value.const_value.numpy()


def roundtrip(model: ir.Model, **config: object) -> tuple[ir.Model, ir.Model]:
    original = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    to = ToMatMulNBits(config)(model).model
    nbits = ir.serde.deserialize_model(ir.serde.serialize_model(to))
    back = FromMatMulNBits()(to).model
    return original, nbits, back  # type: ignore[return-value]


def feeds(model: ir.Model, rank: int, k: int, float_type: type = np.float32) -> dict[str, np.ndarray]:
    shape = (3, k) if rank == 2 else (2, 5, k)
    return {"x": np.random.default_rng(7).standard_normal(shape).astype(float_type)}


@pytest.mark.parametrize(
    ("dtype", "k", "block_size", "rank", "float_type", "bias"),
    [
        ("int4", 128, 32, 2, np.float32, False),
        ("uint4", 100, 32, 3, np.float32, True),  # K not a multiple of the block, odd k_blocks
        ("int8", 72, 16, 3, np.float32, False),
        ("uint8", 256, 64, 2, np.float32, True),
        ("int4", 96, 64, 3, np.float16, True),  # fp16 scales and activations
        ("uint4", 40, 128, 2, np.float16, False),  # K < block_size
    ],
)
def test_roundtrip_is_bit_exact_and_outputs_match(
    dtype: str, k: int, block_size: int, rank: int, float_type: type, bias: bool
) -> None:
    n = 24
    original, nbits, back = roundtrip(dq_model(k, n, block_size, dtype, rank=rank, float_type=float_type, bias=bias))
    assert op_types(nbits) == {"MatMulNBits": 1}
    node = next(iter(nbits.graph))
    assert node.domain == "com.microsoft" and nbits.opset_imports["com.microsoft"] == 1
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    bits = 4 if dtype.endswith("4") else 8
    assert attrs == {"K": k, "N": n, "bits": bits, "block_size": block_size}
    inputs = [*node.inputs, None, None, None][:6]
    assert (inputs[3] is None) == dtype.startswith("int")  # signed: the implicit zero point
    assert (inputs[5] is not None) == bias

    assert op_types(back) == collections.Counter({"DequantizeLinear": 1, "MatMul": 1, **({"Add": 1} if bias else {})})
    for index in (0, 1, 2):
        before, after = initializer(original, "DequantizeLinear", index), initializer(back, "DequantizeLinear", index)
        if before is None:
            assert after is None
            continue
        assert before.dtype == after.dtype and before.shape == after.shape
        assert np.array_equal(before.astype(np.float64), after.astype(np.float64))
    dq = next(n for n in back.graph if n.op_type == "DequantizeLinear")
    assert dq.attributes["axis"].value == 0 and dq.attributes["block_size"].value == block_size
    assert back.graph.outputs[0].name == nbits.graph.outputs[0].name == "y"
    for model in (nbits, back):
        onnx.checker.check_model(onnxq_ir.to_proto(model), full_check=True)

    x = feeds(original, rank, k, float_type)
    (reference,) = session(original, optimize=False).run(None, x)  # DequantizeLinear → MatMul as written
    (fused,) = session(nbits).run(None, x)
    (again,) = session(back, optimize=False).run(None, x)
    assert np.array_equal(reference, again)
    tolerance = 1e-5 if float_type == np.float32 else 2e-3
    assert np.abs(fused.astype(np.float32) - reference).max() <= tolerance * np.abs(reference).max()


def test_nbits_matches_onnxruntimes_own_fusion_byte_for_byte(tmp_path: Path) -> None:
    """onnxruntime fuses the DQ form into MatMulNBits itself: its packed B, scales and zero points are ours."""
    model = dq_model(200, 16, 32, "uint4")  # 7 blocks: odd, and a short last block
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(as_bytes(model), options, providers=["CPUExecutionProvider"])
    fused = onnx.load(options.optimized_model_filepath)
    (node,) = [n for n in fused.graph.node if n.op_type == "MatMulNBits"]
    theirs = {i.name: onnx.numpy_helper.to_array(i) for i in fused.graph.initializer}
    ours = ToMatMulNBits()(model).model
    mine = next(iter(ours.graph))
    for index in (1, 2, 3):  # B (padding of the short last block included), scales, zero points
        their, my = theirs[node.input[index]], mine.inputs[index].const_value.numpy()
        assert their.dtype == my.dtype and np.array_equal(their.reshape(-1), my.reshape(-1)), index


def test_bias_add_is_absorbed_and_accuracy_level_set() -> None:
    model = dq_model(64, 8, 16, "int4", bias=True)
    context = PassContext()
    nbits = ToMatMulNBits({"accuracy_level": 4}, context)(model).model
    (node,) = list(nbits.graph)
    assert node.attributes["accuracy_level"].value == 4
    assert node.inputs[4] is None and node.inputs[5].name == "b"
    assert node.outputs[0].name == "y" and set(nbits.graph.initializers) == {"w_q_nbits", "w_q_nbits_scales", "b"}
    assert context.notes == ["to_matmul_nbits: 1 MatMul → MatMulNBits (1 with bias), accuracy_level 4"]


def test_keep_zero_points_false_drops_implicit_ones() -> None:
    model = dq_model(64, 8, 16, "uint4")
    zero = model.graph.initializers["w_zero"]
    zero.const_value = ir.tensor(np.full((4, 8), 8, ml_dtypes.uint4), name="w_zero")
    nbits = ToMatMulNBits(keep_zero_points=False)(model).model
    assert len(next(iter(nbits.graph)).inputs) == 3


def test_unconvertible_forms_stay_with_a_note() -> None:
    context = PassContext()
    odd = dq_model(96, 8, 32, "int4")
    odd.graph.node(0).attributes["block_size"] = ir.AttrInt64("block_size", 48)
    odd.graph.initializers["w_scale"].const_value = ir.tensor(np.ones((2, 8), np.float32), name="w_scale")
    result = ToMatMulNBits(context=context)(odd)
    assert not result.modified and op_types(result.model) == {"DequantizeLinear": 1, "MatMul": 1}
    assert context.notes == [
        "to_matmul_nbits: kept 1 DequantizeLinear→MatMul: block_size 48 (MatMulNBits takes 16, 32, 64, 128, 256) (mm)"
    ]


def test_from_matmul_nbits_raises_the_opset_only_where_that_is_safe() -> None:
    nbits = ToMatMulNBits()(dq_model(64, 8, 16, "int4")).model
    nbits.opset_imports[""] = 17
    back = FromMatMulNBits()(nbits).model
    assert back.opset_imports[""] == 21 and "com.microsoft" not in back.opset_imports
    assert session(back).run(None, feeds(back, 2, 64))[0].shape == (3, 8)

    nbits = ToMatMulNBits()(dq_model(64, 8, 16, "int4")).model
    nbits.opset_imports[""] = 17
    reduce = ir.node("ReduceMean", [nbits.graph.outputs[0]], attributes={"axes": [1]}, name="mean")
    nbits.graph.append(reduce)
    with pytest.raises(UsageError, match="upgrade_opset"):
        FromMatMulNBits()(nbits)


@pytest.mark.parametrize("dtype", ["int4", "uint4", "int8", "uint8"])
def test_onnxruntime_fuses_the_dq_form(dtype: str) -> None:
    """What onnxq emits is what onnxruntime turns into MatMulNBits (table in passes/matmul_nbits.py)."""
    for block_size, k, rank in ((16, 64, 2), (32, 100, 3), (256, 512, 2)):
        counts = optimized_op_counts(dq_model(k, 16, block_size, dtype, rank=rank))
        assert counts == {"MatMulNBits": 1}, (block_size, k, counts)


def test_fused_dq_form_equals_nbits_at_the_same_accuracy_level() -> None:
    """onnxruntime fuses with accuracy_level 4 (int8 activations) unless told otherwise."""
    model = dq_model(256, 32, 32, "int4")
    x = feeds(model, 2, 256)
    (exact,) = session(model, optimize=False).run(None, x)
    (fused_default,) = session(model).run(None, x)
    (fused_level0,) = session(model, dq_accuracy=0).run(None, x)
    level4 = ToMatMulNBits(accuracy_level=4)(dq_model(256, 32, 32, "int4")).model
    (ours_level4,) = session(level4).run(None, x)
    assert np.array_equal(fused_level0, exact)
    assert np.array_equal(fused_default, ours_level4)
    assert 0 < np.abs(fused_default - exact).max() < 0.05 * np.abs(exact).max()


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_onnxruntime_quantizer_output_converts_and_comes_back_identical(bits: int, symmetric: bool) -> None:
    """MatMulNBits written by onnxruntime's own quantizer (opset 17) → DQ form → the same bytes again."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    w = np.random.default_rng(3).normal(0, 0.2, (100, 24)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["M", 100])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["M", 24])],
        initializer=[onnx.numpy_helper.from_array(w, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
    quantizer.process()
    nbits = ir.serde.deserialize_model(quantizer.model.model)
    theirs = [v.const_value.numpy() if v is not None else None for v in next(iter(nbits.graph)).inputs[1:]]
    x = feeds(nbits, 2, 100)
    (expected,) = session(nbits).run(None, x)

    back = FromMatMulNBits()(nbits).model
    assert back.opset_imports[""] == 21 and op_types(back) == {"DequantizeLinear": 1, "MatMul": 1}
    dtype = back.graph.initializers[next(iter(back.graph)).inputs[0].name].dtype
    assert dtype == {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4}.get(
        (bits, symmetric), ir.DataType.INT8 if symmetric else ir.DataType.UINT8
    )
    (dq_output,) = session(back, optimize=False).run(None, x)
    assert np.abs(dq_output - expected).max() <= 1e-5 * np.abs(expected).max()

    again = ToMatMulNBits()(back).model
    ours = [v.const_value.numpy() if v is not None else None for v in next(iter(again.graph)).inputs[1:]]
    for mine, their in zip(ours, theirs, strict=True):
        assert mine.dtype == their.dtype and mine.shape == their.shape and np.array_equal(mine, their)


def test_gemm_shared_weight_and_double_quantized_scales() -> None:
    """A Gemm with its bias, a second MatMul on the same DequantizeLinear (packed once), and block scales
    that are themselves DequantizeLinear(uint8) are all folded into MatMulNBits."""
    model = dq_model(64, 8, 16, "uint4", seed=2)
    graph = model.graph
    dq = graph.node("dq")
    x = graph.inputs[0]
    scale = graph.initializers["w_scale"].const_value.numpy()
    step = np.float32(scale.max() / 255)
    codes = np.rint(scale / step).astype(np.uint8)
    scale_codes, scale_step = _const("s_q", codes), _const("s_step", np.full((4, 1), step, np.float32))
    graph.register_initializer(scale_codes)
    graph.register_initializer(scale_step)
    scale_dq = ir.node("DequantizeLinear", [scale_codes, scale_step], attributes={"axis": 1, "block_size": 8})
    graph.insert_before(dq, scale_dq)
    dq.replace_input_with(1, scale_dq.outputs[0])
    graph.initializers.pop("w_scale")
    bias = _const("c", np.arange(8, dtype=np.float32))
    graph.register_initializer(bias)
    gemm = ir.node("Gemm", [x, dq.outputs[0], bias], name="gemm")
    gemm.outputs[0].name, gemm.outputs[0].dtype = "z", ir.DataType.FLOAT
    graph.append(gemm)
    graph.outputs.append(gemm.outputs[0])
    reference = session(model, optimize=False).run(None, feeds(model, 2, 64))

    context = PassContext()
    nbits = ToMatMulNBits(context=context)(model).model
    assert op_types(nbits) == {"MatMulNBits": 2}
    first, second = list(nbits.graph)
    assert first.inputs[1:4] == second.inputs[1:4] and second.inputs[5].name == "c"
    assert len(nbits.graph.initializers) == 4  # B, scales, zero points, bias: the float-scale chain is gone
    assert np.array_equal(first.inputs[2].const_value.numpy(), (codes.astype(np.float32) * step).T)
    outputs = session(nbits).run(None, feeds(model, 2, 64))
    for ours, theirs in zip(outputs, reference, strict=True):
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()
    assert context.notes == ["to_matmul_nbits: 2 MatMul → MatMulNBits (1 with bias)"]


@pytest.mark.parametrize("dtype", ["int2", "uint2"])
def test_two_bit_weights_round_trip_at_opset_25(dtype: str) -> None:
    original, nbits, back = roundtrip(dq_model(80, 8, 16, dtype, opset=25))
    (node,) = list(nbits.graph)
    assert node.attributes["bits"].value == 2 and node.inputs[1].const_value.numpy().shape == (8, 5, 4)
    for index in (0, 1, 2) if dtype == "uint2" else (0, 1):
        before, after = initializer(original, "DequantizeLinear", index), initializer(back, "DequantizeLinear", index)
        assert before.dtype == after.dtype and np.array_equal(before.astype(np.float64), after.astype(np.float64))
    x = feeds(original, 2, 80)
    (reference,) = session(original, optimize=False).run(None, x)
    (ours,) = session(nbits).run(None, x)
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()

    low = ToMatMulNBits()(dq_model(80, 8, 16, dtype, opset=25)).model
    low.opset_imports[""] = 21
    low.graph.append(ir.node("Cast", [low.graph.outputs[0]], attributes={"to": ir.DataType.FLOAT16}))
    context = PassContext()
    assert not FromMatMulNBits(context=context)(low).modified  # Cast changed between 21 and 25
    assert context.notes == [
        "from_matmul_nbits: kept 1 MatMulNBits: 2-bit DequantizeLinear needs opset 25; run upgrade_opset with "
        "target 25 first (mm_nbits)"
    ]


def test_relu_between_two_quantized_matmuls_blocks_onnxruntimes_fusion_but_not_ours() -> None:
    """DQ→MatMul→Relu→DQ→MatMul: onnxruntime 1.31 leaves the first DequantizeLinear→MatMul unfused."""
    model = dq_model(64, 32, 16, "uint4", rank=3)
    graph = model.graph
    relu = ir.node("Relu", [graph.outputs[0]], name="relu")
    q, scale, zero = block_quantize(np.random.default_rng(4).normal(0, 0.2, (32, 8)).astype(np.float32), 16, "uint4")
    consts = [_const("w2_q", q), _const("w2_scale", scale), _const("w2_zero", zero)]
    dq2 = ir.node("DequantizeLinear", consts, attributes={"axis": 0, "block_size": 16}, name="dq2")
    mm2 = ir.node("MatMul", [relu.outputs[0], dq2.outputs[0]], name="mm2")
    for value in consts:
        graph.register_initializer(value)
    graph.extend([relu, dq2, mm2])
    graph.outputs[0].name = "h"
    mm2.outputs[0].name, mm2.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph.outputs[0] = mm2.outputs[0]
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(as_bytes(model), options, providers=["CPUExecutionProvider"])
        theirs = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert theirs == {"DequantizeLinear": 1, "MatMul": 1, "Relu": 1, "MatMulNBits": 1}, "update the table"
    x = feeds(model, 3, 64)
    (reference,) = session(model, optimize=False).run(None, x)
    ours = ToMatMulNBits()(model).model
    assert op_types(ours) == {"MatMulNBits": 2, "Relu": 1}
    (output,) = session(ours).run(None, x)
    assert np.abs(output - reference).max() <= 1e-5 * np.abs(reference).max()
