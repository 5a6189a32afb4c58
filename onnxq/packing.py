"""Bit packing in the layout of onnxruntime's `com.microsoft::MatMulNBits`.

MatMulNBits computes Y = A @ Ŵ (+ bias) with Ŵ[k, n] = (code − zero) · scale of the block holding row k:

- B: uint8 [N, k_blocks, blob_size], k_blocks = ceil(K / block_size), blob_size = block_size · bits / 8:
  one row per output column n, its K unsigned codes cut into blocks and each block packed as a bit stream,
  first value in the lowest bits (4-bit: element 2i in the low nibble of byte i). K is padded up to a
  whole number of blocks; the padding is never read against A, and is zero bytes, as onnxruntime's own
  quantizer (and its 4-bit DQ fusion) writes it, so our B is byte-identical to theirs.
- scales: [N, k_blocks] (or flat [N · k_blocks]), the transpose of DequantizeLinear's [k_blocks, N].
- zero_points (packed uint8 form): [N · ceil(k_blocks · bits / 8)]: each column's k_blocks codes packed
  like B, and every column starts on a byte boundary, so an odd k_blocks leaves 4 unused bits per column.
  Absent, the zero point is 2^(bits−1): a signed code q ∈ [−2^(bits−1), 2^(bits−1)) is stored as
  q + 2^(bits−1) and needs no zero-point input at all.

Codes here are unsigned (0 .. 2^bits − 1); `to_unsigned` / `to_signed` move between the int4/int8
codes of DequantizeLinear and these.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)  # layout defined by the spec; onnxruntime's CPU kernel runs 2, 4 and 8


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def k_blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def blob_size(block_size: int, bits: int) -> int:
    return -(-block_size * bits // 8)


def zero_point_bytes(k_blocks: int, bits: int) -> int:
    """Bytes per column of packed zero points."""
    return -(-k_blocks * bits // 8)


def default_zero_point(bits: int) -> int:
    return 1 << (bits - 1)


def to_unsigned(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes [−2^(bits−1), 2^(bits−1)) → MatMulNBits codes with the implicit zero point 2^(bits−1)."""
    return (q.astype(np.int16) + default_zero_point(bits)).astype(np.uint8)


def to_signed(codes: np.ndarray, bits: int) -> np.ndarray:
    return (codes.astype(np.int16) - default_zero_point(bits)).astype(np.int8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of unsigned `codes` into uint8, lowest bits first: [..., L] → [..., ceil(L·bits/8)]."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes out of the {bits}-bit range [0, {(1 << bits) - 1}]")
    *lead, length = codes.shape
    stream = np.unpackbits(codes.astype(np.uint8)[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = stream.reshape(*lead, length * bits)
    return np.packbits(stream, axis=-1, bitorder="little")  # pads the last byte with zero bits


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` codes of every packed row, as uint8."""
    _check_bits(bits)
    packed = np.asarray(packed, dtype=np.uint8)
    *lead, nbytes = packed.shape
    if nbytes * 8 < count * bits:
        raise ValueError(f"{nbytes} bytes hold fewer than {count} {bits}-bit codes")
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : count * bits].reshape(*lead, count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.astype(np.uint16) @ weights).astype(np.uint8)


def pack_weight(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Unsigned codes W [K, N] → B uint8 [N, k_blocks, blob_size]; a short last block is padded with zeros."""
    _check_bits(bits)
    k, n = codes.shape
    blocks = k_blocks(k, block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.uint8)
    padded[:k] = codes
    return pack_bits(padded.T.reshape(n, blocks, block_size), bits)


def unpack_weight(packed: np.ndarray, k: int, bits: int, block_size: int) -> np.ndarray:
    """B uint8 [N, k_blocks, blob_size] → unsigned codes W [K, N] (padding rows dropped)."""
    n, blocks, size = packed.shape
    if blocks != k_blocks(k, block_size) or size != blob_size(block_size, bits):
        raise ValueError(
            f"B has shape {packed.shape}; K={k}, block_size={block_size}, bits={bits} need "
            f"[{n}, {k_blocks(k, block_size)}, {blob_size(block_size, bits)}]"
        )
    codes = unpack_bits(packed, bits, block_size)  # [N, k_blocks, block_size]
    return np.ascontiguousarray(codes.reshape(n, blocks * block_size)[:, :k].T)


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned zero points [k_blocks, N] → flat uint8 [N · ceil(k_blocks · bits / 8)], one byte-aligned run
    per column."""
    return pack_bits(np.ascontiguousarray(zero_points.T), bits).reshape(-1)


def unpack_zero_points(packed: np.ndarray, n: int, blocks: int, bits: int) -> np.ndarray:
    """Packed uint8 zero points (flat or [N, bytes]) → unsigned [k_blocks, N]."""
    per_column = zero_point_bytes(blocks, bits)
    if packed.size != n * per_column:
        raise ValueError(f"{packed.size} zero-point bytes; N={n}, k_blocks={blocks}, bits={bits} need {n * per_column}")
    return np.ascontiguousarray(unpack_bits(packed.reshape(n, per_column), bits, blocks).T)


def dequantize(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    k: int,
    bits: int,
    block_size: int,
) -> np.ndarray:
    """What MatMulNBits multiplies A by: float32 Ŵ [K, N] from B, scales ([N, k_blocks] or flat) and packed
    uint8 zero points (None: 2^(bits−1))."""
    n, blocks, _ = packed.shape
    codes = unpack_weight(packed, k, bits, block_size).astype(np.int32)
    if zero_points is None:
        zero = np.full((blocks, n), default_zero_point(bits), np.int32)
    else:
        zero = unpack_zero_points(zero_points, n, blocks, bits).astype(np.int32)
    scale = np.asarray(scales).reshape(n, blocks).T.astype(np.float32)
    rows = np.repeat(np.arange(blocks), block_size)[:k]
    return ((codes - zero[rows]) * scale[rows]).astype(np.float32)
