"""Quantization math in plain numpy: parameters, quantize/dequantize, and error metrics.

Affine quantization maps a real x to q = clip(round(x / s) + z, qmin, qmax) and back to x' = (q - z) * s.
Rounding is half-to-even, as QuantizeLinear specifies, so numpy and onnxruntime agree bit for bit.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

IntDType = Literal["int4", "uint4", "int8", "uint8", "int16", "uint16", "int32"]

RANGES: dict[str, tuple[int, int]] = {
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
    "int32": (-(2**31), 2**31 - 1),
}
NUMPY_STORAGE: dict[str, type] = {
    "int4": np.int8,
    "uint4": np.uint8,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
}
# Smallest scale we emit: a constant-zero tensor still needs a positive scale.
MIN_SCALE = np.float32(1e-8)


def qrange(dtype: str, symmetric: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """Integer range. Symmetric signed types drop the lowest code so that -x and x both fit (-127..127).

    `reduce_range` halves 8-bit ranges (int8 symmetric: -64..64): x86 integer kernels without VNNI
    (AVX2, AVX-512BW) add pairs of u8·s8 products in int16, which saturates with full 8-bit weights
    (255·127·2 > 32767) and silently costs ~10 dB of output SQNR; 255·64·2 fits.
    """
    qmin, qmax = RANGES[dtype]
    if reduce_range and dtype in ("int8", "uint8"):
        qmin, qmax = (-64, 64) if qmin < 0 and symmetric else (qmin // 2, qmax // 2)
    elif symmetric and qmin < 0:
        qmin = -qmax
    return qmin, qmax


def qparams(
    rmin: np.ndarray | float, rmax: np.ndarray | float, dtype: str, symmetric: bool, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point covering [rmin, rmax] (widened to include 0, so 0.0 is exact).

    Symmetric: s = max(|rmin|, |rmax|) / qmax' with z at the middle code (0 signed, 128 for uint8).
    Asymmetric: s = (rmax - rmin) / (qmax - qmin), z = round(qmin - rmin / s).
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    qmin, qmax = qrange(dtype, symmetric, reduce_range)
    if symmetric:
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        if qmin < 0:
            scale = absmax / qmax
            zero = np.zeros_like(scale)
        else:  # unsigned symmetric: zero point at the middle code, +absmax at the top code
            middle = (qmax + qmin + 1) // 2
            scale = absmax / (qmax - middle)
            zero = np.full_like(scale, middle)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero = np.clip(np.round(qmin - rmin / safe), qmin, qmax)
    # An all-zero tensor: any scale is exact; 1.0 (as onnxruntime does) keeps derived bias scales sane.
    scale = np.where(scale == 0, 1.0, np.maximum(scale, MIN_SCALE)).astype(np.float32)
    return scale, zero.astype(NUMPY_STORAGE[dtype])


def _broadcast(param: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or param.ndim == 0:
        return param
    shape = [1] * ndim
    shape[axis] = -1
    return param.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, dtype: str, axis: int | None = None) -> np.ndarray:
    """QuantizeLinear in numpy (per-tensor, or per-channel along `axis`)."""
    qmin, qmax = RANGES[dtype]
    s = _broadcast(np.asarray(scale, dtype=np.float32), x.ndim, axis)
    z = _broadcast(np.asarray(zero).astype(np.int64), x.ndim, axis)
    q = np.rint(x.astype(np.float32) / s).astype(np.int64) + z
    return np.clip(q, qmin, qmax).astype(NUMPY_STORAGE[dtype])


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int | None = None) -> np.ndarray:
    """DequantizeLinear in numpy."""
    s = _broadcast(np.asarray(scale, dtype=np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero).astype(np.int64), q.ndim, axis)
    return ((q.astype(np.int64) - z) * s).astype(np.float32)


def per_channel_minmax(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of every slice along `axis` (the output channel of a weight)."""
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return moved.min(axis=1), moved.max(axis=1)


def quantize_weight(
    w: np.ndarray,
    dtype: str,
    symmetric: bool,
    axis: int | None,
    reduce_range: bool = False,
    min_scale: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest weight quantization; `axis=None` for per-tensor. Returns (q, scale, zero).

    `min_scale` floors the scale (per channel): the bias of an integer kernel is stored at s_x·s_w in
    int32, so a large bias over a tiny input scale needs a coarser weight scale to fit (see bias_min_weight_scale).
    """
    if axis is None:
        rmin, rmax = np.array(w.min()), np.array(w.max())
    else:
        rmin, rmax = per_channel_minmax(w, axis)
    scale, zero = qparams(rmin, rmax, dtype, symmetric, reduce_range)
    if min_scale is not None and np.any(np.asarray(min_scale) > scale):
        scale = np.maximum(scale, np.asarray(min_scale, dtype=np.float32)).astype(np.float32)
        if not symmetric:
            qmin, qmax = qrange(dtype, symmetric, reduce_range)
            zero = np.clip(np.round(qmin - np.minimum(rmin, 0) / scale), qmin, qmax).astype(zero.dtype)
    return quantize(w, scale, zero, dtype, axis), scale, zero


# Largest |bias| in int32 codes: half the range, leaving the rest for the sum of products.
BIAS_LIMIT = 2**30


def bias_min_weight_scale(bias: np.ndarray, input_scale: float, per_channel: bool) -> np.ndarray:
    """Smallest weight scale for which the bias fits in ±BIAS_LIMIT codes at scale s_x·s_w."""
    need = np.abs(bias.astype(np.float64)) / (np.float64(input_scale) * BIAS_LIMIT)
    return (need if per_channel else np.asarray(need.max(initial=0.0))).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale s_x * s_w, the layout integer Conv/Gemm kernels accumulate in."""
    # Exactly s_x·s_w (no floor): integer kernels take the bias as already being at that scale.
    scale = (np.float64(input_scale) * weight_scale.astype(np.float64)).astype(np.float32)
    q = np.clip(np.rint(bias.astype(np.float64) / scale), *RANGES["int32"]).astype(np.int32)
    return q, scale


# --- error metrics -------------------------------------------------------------------------------------


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio, 10·log10(Σref² / Σ(ref-test)²); +inf when identical."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = np.sum((ref - np.asarray(test, dtype=np.float64)) ** 2)
    signal = np.sum(ref**2)
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def top1_agreement(reference: np.ndarray, test: np.ndarray) -> float:
    """Share of rows whose argmax over the last axis agrees."""
    if reference.ndim < 1 or reference.shape[-1] < 2:
        return float("nan")
    return float(np.mean(np.argmax(reference, axis=-1) == np.argmax(test, axis=-1)))
