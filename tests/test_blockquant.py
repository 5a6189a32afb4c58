"""Block quantization math: error bounds (property tests), GPTQ/AWQ never worse than RTN where they promise,
double quantization bounds, and the Hessian that onnxruntime computes in-graph."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper

from onnxq import blockquant, qmath
from onnxq import ir as onnxq_ir
from onnxq.calibration.session import collect_ranges

FORMATS = [("int4", True), ("uint4", False), ("int8", True), ("uint8", False)]
weights = st.tuples(st.integers(1, 70), st.integers(1, 9)).flatmap(
    lambda shape: arrays(np.float32, shape, elements=st.floats(-4, 4, width=32))
)


@settings(max_examples=80, deadline=None)
@given(weights, st.sampled_from([16, 32, 64]), st.sampled_from(FORMATS))
def test_rtn_error_is_at_most_half_a_step(w: np.ndarray, block_size: int, fmt: tuple[str, bool]) -> None:
    dtype, symmetric = fmt
    quant = blockquant.rtn(w, block_size, dtype, symmetric)
    assert quant.scale.shape == (-(-w.shape[0] // block_size), w.shape[1])
    qmin, qmax = qmath.RANGES[dtype]
    assert quant.q.min() >= qmin and quant.q.max() <= qmax
    assert (quant.zero is None) == symmetric
    step = quant.expanded(quant.scale)
    np.testing.assert_array_less(np.abs(quant.dequantize() - w), step * 0.5001 + 1e-7)


@settings(max_examples=40, deadline=None)
@given(weights, st.sampled_from(FORMATS))
def test_stored_codes_reproduce_the_dequantized_weights(w: np.ndarray, fmt: tuple[str, bool]) -> None:
    quant = blockquant.rtn(w, 16, *fmt)
    again = blockquant.quantize_blocks(quant.dequantize(), quant.scale, quant.zero, 16, fmt[0])
    np.testing.assert_array_equal(again, quant.q)  # dequantized values sit exactly on the grid


def _layer(seed: int, k: int = 96, n: int = 48, rows: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) @ (rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k))
    x[:, :4] *= 6.0
    return (rng.standard_normal((k, n)) * 0.1).astype(np.float32), x.T @ x / rows


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([16, 32]), st.sampled_from(FORMATS[:2]), st.booleans())
def test_gptq_lowers_the_output_error_of_rtn(
    seed: int, block_size: int, fmt: tuple[str, bool], act_order: bool
) -> None:
    w, hessian = _layer(seed)
    rtn = blockquant.output_error(w, blockquant.rtn(w, block_size, *fmt).dequantize(), hessian)
    gptq = blockquant.output_error(
        w, blockquant.gptq(w, hessian, block_size, *fmt, act_order=act_order).dequantize(), hessian
    )
    assert gptq < 0.7 * rtn, (gptq, rtn)


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(FORMATS[:2]))
def test_awq_scaling_is_never_worse_than_rtn(seed: int, fmt: tuple[str, bool]) -> None:
    w, hessian = _layer(seed)
    scale, alpha = blockquant.awq_scales(w, hessian, 32, *fmt, grid=10)
    scaled = blockquant.rtn(w * scale[:, None], 32, *fmt).dequantize() / scale[:, None]
    rtn = blockquant.rtn(w, 32, *fmt).dequantize()
    assert blockquant.output_error(w, scaled, hessian) <= blockquant.output_error(w, rtn, hessian) + 1e-9
    assert (alpha == 0.0) == bool(np.all(scale == 1.0))


def test_gptq_handles_dead_inputs_and_a_singular_hessian() -> None:
    w, hessian = _layer(0, k=32, n=8, rows=4)  # 4 rows: rank 4 of 32
    hessian[5, :] = hessian[:, 5] = 0.0  # an input channel that is always zero
    quant = blockquant.gptq(w, hessian, 16, "uint4", False)
    assert np.isfinite(quant.dequantize()).all()
    np.testing.assert_array_equal(quant.dequantize()[5], 0.0)  # no input, no weight: zero is exact


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 600)), elements=st.floats(2**-13, 2.0, width=32)))
def test_double_quantized_scales_stay_within_half_a_second_level_step(scale: np.ndarray) -> None:
    double = blockquant.double_quantize(scale, super_block=256)
    step = np.repeat(double.scale, 256, axis=1)[:, : scale.shape[1]]
    error = np.abs(double.dequantize() - scale)
    assert np.all((error <= step * 0.5001) | (double.codes == 1))  # codes floor at 1: no scale becomes 0
    assert double.codes.dtype == np.uint8 and double.scale.shape[1] == -(-scale.shape[1] // 256)


def test_in_graph_gram_equals_numpy() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 8])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["b", "t", 8])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, t, 8)).astype(np.float32) for t in (3, 7, 5)]  # varying lengths
    found, _ = collect_ranges(onnxq_ir.from_proto(proto), ["r"], lambda: iter({"x": b} for b in batches), method="gram")
    rows = np.concatenate([np.maximum(b, 0).reshape(-1, 8) for b in batches]).astype(np.float64)
    np.testing.assert_allclose(found["r"], rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
