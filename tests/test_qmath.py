"""Quantization math: error bounds (property tests) and bit-exact agreement with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from onnxq import qmath

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@given(
    arrays(np.float32, st.integers(1, 64), elements=finite),
    st.sampled_from(["int8", "uint8", "int16", "uint16"]),
    st.booleans(),
)
def test_roundtrip_error_is_at_most_half_a_step(x: np.ndarray, dtype: str, symmetric: bool) -> None:
    scale, zero = qmath.qparams(x.min(), x.max(), dtype, symmetric)
    x_hat = qmath.dequantize(qmath.quantize(x, scale, zero, dtype), scale, zero)
    float32_slack = 4 * np.finfo(np.float32).eps * max(float(np.abs(x).max()), 1.0)  # rounding in (q - z) * s
    assert np.max(np.abs(x_hat - x)) <= scale * 0.5 * (1 + 1e-4) + float32_slack


@given(finite, finite, st.sampled_from(["int8", "uint8", "int4", "uint4"]), st.booleans())
def test_zero_is_exact(a: float, b: float, dtype: str, symmetric: bool) -> None:
    scale, zero = qmath.qparams(min(a, b), max(a, b), dtype, symmetric)
    q = qmath.quantize(np.zeros(1, np.float32), scale, zero, dtype)
    assert qmath.dequantize(q, scale, zero)[0] == 0.0
    lo, hi = qmath.RANGES[dtype]
    assert lo <= int(zero) <= hi


@given(arrays(np.float32, (4, 6), elements=finite))
def test_per_channel_symmetric_weights_use_full_range_per_row(w: np.ndarray) -> None:
    q, _scale, zero = qmath.quantize_weight(w, "int8", True, axis=0)
    assert q.dtype == np.int8 and np.all(zero == 0)
    for row, qrow in zip(w, q, strict=True):
        if np.abs(row).max() > 1e-6:
            assert np.abs(qrow).max() == 127
    assert q.min() >= -127  # symmetric range leaves -128 unused


def _ort_quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None) -> np.ndarray:
    attrs = {"axis": axis} if axis is not None else {}
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], **attrs)
    zero_type = helper.np_dtype_to_tensor_dtype(zero.dtype)
    graph = helper.make_graph(
        [node],
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", zero_type, list(x.shape))],
        initializer=[numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@settings(max_examples=30, deadline=None)
@given(
    arrays(np.float32, (3, 5), elements=finite),
    st.sampled_from(["int8", "uint8"]),
    st.booleans(),
    st.sampled_from([None, 0, 1]),
)
def test_numpy_quantize_matches_onnxruntime_bit_for_bit(
    x: np.ndarray, dtype: str, symmetric: bool, axis: int | None
) -> None:
    if axis is None:
        scale, zero = qmath.qparams(x.min(), x.max(), dtype, symmetric)
    else:
        scale, zero = qmath.qparams(*qmath.per_channel_minmax(x, axis), dtype, symmetric)
    ours = qmath.quantize(x, scale, zero, dtype, axis)
    theirs = _ort_quantize(x, np.asarray(scale, np.float32), np.asarray(zero), axis)
    np.testing.assert_array_equal(ours, theirs)


def test_bias_scale_is_input_times_weight_scale() -> None:
    q, scale = qmath.quantize_bias(np.array([0.5, -1.0], np.float32), 0.1, np.array([0.01, 0.02], np.float32))
    np.testing.assert_allclose(scale, [0.001, 0.002], rtol=1e-6)
    np.testing.assert_array_equal(q, [500, -500])


@pytest.mark.parametrize(
    ("ref", "test", "expected"), [([1.0, 1.0], [1.0, 1.0], float("inf")), ([3.0, 4.0], [3.0, 3.0], 10 * np.log10(25.0))]
)
def test_sqnr(ref: list[float], test: list[float], expected: float) -> None:
    assert qmath.sqnr_db(np.array(ref), np.array(test)) == pytest.approx(expected)


@given(arrays(np.float32, (4, 6), elements=finite))
def test_reduce_range_keeps_u8s8_pair_sums_inside_int16(w: np.ndarray) -> None:
    q, _scale, _zero = qmath.quantize_weight(w, "int8", True, axis=0, reduce_range=True)
    assert np.abs(q.astype(np.int32)).max() <= 64
    assert 255 * 64 * 2 <= 32767
