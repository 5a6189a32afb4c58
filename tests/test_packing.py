"""MatMulNBits bit packing: round trips, the documented layout, and onnxruntime reading our bytes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxq import packing

BITS = st.sampled_from([2, 3, 4, 5, 6, 7, 8])
ORT_BITS = st.sampled_from([2, 4, 8])  # what onnxruntime's CPU kernel runs


def _codes(seed: int, shape: tuple[int, ...], bits: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, shape).astype(np.uint8)


@given(bits=BITS, rows=st.integers(0, 4), length=st.integers(0, 70), seed=st.integers(0, 2**32 - 1))
def test_pack_bits_round_trip(bits: int, rows: int, length: int, seed: int) -> None:
    codes = _codes(seed, (rows, length), bits)
    packed = packing.pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (rows, -(-length * bits // 8))
    assert np.array_equal(packing.unpack_bits(packed, bits, length), codes)


@given(
    bits=BITS,
    k=st.integers(1, 300),
    n=st.integers(1, 9),
    block_size=st.sampled_from([16, 32, 64, 128, 256]),
    seed=st.integers(0, 2**32 - 1),
)
def test_weight_and_zero_point_round_trip(bits: int, k: int, n: int, block_size: int, seed: int) -> None:
    codes = _codes(seed, (k, n), bits)
    blocks = packing.k_blocks(k, block_size)
    b = packing.pack_weight(codes, bits, block_size)
    assert b.shape == (n, blocks, block_size * bits // 8)
    assert np.array_equal(packing.unpack_weight(b, k, bits, block_size), codes)
    zero = _codes(seed + 1, (blocks, n), bits)
    packed_zero = packing.pack_zero_points(zero, bits)
    assert packed_zero.shape == (n * -(-blocks * bits // 8),)
    assert np.array_equal(packing.unpack_zero_points(packed_zero, n, blocks, bits), zero)


@given(bits=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**32 - 1))
def test_signed_codes_shift_by_the_implicit_zero_point(bits: int, seed: int) -> None:
    half = 1 << (bits - 1)
    signed = np.random.default_rng(seed).integers(-half, half, 50).astype(np.int8)
    unsigned = packing.to_unsigned(signed, bits)
    assert unsigned.min() >= 0 and unsigned.max() < 1 << bits
    assert np.array_equal(packing.to_signed(unsigned, bits), signed)


def test_layout_is_low_bits_first_and_zero_points_byte_aligned_per_column() -> None:
    assert packing.pack_bits(np.array([1, 2, 3, 4], np.uint8), 4).tolist() == [0x21, 0x43]
    assert packing.pack_bits(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [0b00111001]
    assert packing.pack_bits(np.array([5, 6], np.uint8), 8).tolist() == [5, 6]
    # 3 blocks per column: 12 bits → 2 bytes per column, the upper half of the 2nd byte unused
    zero = np.array([[1, 4], [2, 5], [3, 6]], np.uint8)  # [k_blocks, N]
    assert packing.pack_zero_points(zero, 4).tolist() == [0x21, 0x03, 0x54, 0x06]
    # K = 20 with blocks of 16: the second block has 4 codes and 12 zero codes of padding
    codes = np.arange(20, dtype=np.uint8).reshape(20, 1) % 16
    b = packing.pack_weight(codes, 4, 16)
    assert b.shape == (1, 2, 8) and b[0, 1].tolist() == [0x10, 0x32, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="range"):
        packing.pack_bits(np.array([16], np.uint8), 4)


def _nbits_model(
    k: int, n: int, bits: int, block_size: int, b: np.ndarray, scales: np.ndarray, zero: np.ndarray | None
) -> bytes:
    inputs = ["a", "b", "scales"] + (["zero"] if zero is not None else [])
    initializers = [numpy_helper.from_array(b, "b"), numpy_helper.from_array(scales, "scales")]
    if zero is not None:
        initializers.append(numpy_helper.from_array(zero, "zero"))
    node = helper.make_node(
        "MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size
    )
    graph = helper.make_graph(
        [node],
        "nbits",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


@settings(max_examples=30, deadline=None)
@given(
    bits=ORT_BITS,
    k=st.integers(1, 160),
    n=st.integers(1, 12),
    block_size=st.sampled_from([16, 32, 64]),
    with_zero=st.booleans(),
    flat_scales=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_onnxruntime_reads_our_packing(
    bits: int, k: int, n: int, block_size: int, with_zero: bool, flat_scales: bool, seed: int
) -> None:
    """A @ dequantize(B) in numpy equals onnxruntime's MatMulNBits on the same bytes."""
    rng = np.random.default_rng(seed)
    blocks = packing.k_blocks(k, block_size)
    b = packing.pack_weight(_codes(seed, (k, n), bits), bits, block_size)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    zero = packing.pack_zero_points(_codes(seed + 1, (blocks, n), bits), bits) if with_zero else None
    scales_in = scales.reshape(-1) if flat_scales else scales
    a = rng.standard_normal((3, k)).astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = _nbits_model(k, n, bits, block_size, b, scales_in, zero)
    (y,) = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, {"a": a})
    w = packing.dequantize(b, scales, zero, k, bits, block_size)
    expected = a.astype(np.float64) @ w.astype(np.float64)
    bound = np.abs(a).astype(np.float64) @ np.abs(w).astype(np.float64)
    assert np.all(np.abs(y - expected) <= 1e-5 * bound + 1e-6)


def test_onnxruntime_ignores_the_padding() -> None:
    """Whatever the padding codes of a short last block hold, the product is the same."""
    k, n, bits, block_size = 40, 3, 4, 32
    codes = _codes(5, (k, n), bits)
    b = packing.pack_weight(codes, bits, block_size)
    garbage = b.copy()
    garbage[:, -1, (k % block_size) // 2 :] = 0xA7
    scales = np.full((n, 2), 0.1, np.float32)
    a = np.random.default_rng(0).standard_normal((2, k)).astype(np.float32)
    run = [
        ort.InferenceSession(
            _nbits_model(k, n, bits, block_size, blob, scales, None), providers=["CPUExecutionProvider"]
        ).run(None, {"a": a})[0]
        for blob in (b, garbage)
    ]
    assert np.array_equal(run[0], run[1])
    assert np.array_equal(packing.unpack_weight(garbage, k, bits, block_size), codes)
