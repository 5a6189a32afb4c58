"""Block-wise weight quantization along the reduction axis K of a MatMul weight W [K, N].

A block is `block_size` consecutive rows of one column; it gets its own scale (and zero point when
asymmetric). That is the layout of DequantizeLinear with `block_size` (opset 21, axis 0) and of
onnxruntime's MatMulNBits, so both lowerings store exactly what is computed here.

- RTN: each block's range mapped onto the integer grid, rounded to nearest.
- GPTQ (Frantar et al. 2023): columns of Wᵀ are quantized one input channel at a time and each rounding
  error is spread over the channels not yet quantized through the inverse Hessian H = E[x xᵀ] of the
  layer input, which minimises ‖X(W − Ŵ)‖² greedily. Lazy batches of 128 channels keep it in BLAS.
- AWQ-style scaling (Lin et al. 2024): input channel k is multiplied by s_k = a_k^α before quantizing
  (and the activation divided by s_k), which gives salient channels (large a_k = RMS of x_k) finer steps;
  α is picked on a grid to minimise the Hessian-weighted output error tr(ΔᵀHΔ), so α = 0 (plain RTN) is
  among the candidates and the search never does worse than RTN by that measure.
- Double quantization (QLoRA, Dettmers et al. 2023): the block scales themselves stored as uint8 with
  one float scale per `super_block` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxq import qmath


@dataclass(frozen=True)
class BlockQuant:
    """Integer codes [K, N], scales [ceil(K/bs), N] and zero points (None: symmetric signed, zero 0)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray | None
    block_size: int
    dtype: str

    def expanded(self, param: np.ndarray) -> np.ndarray:
        """A per-block parameter repeated over the rows of its block: [ceil(K/bs), N] → [K, N]."""
        return np.repeat(param, self.block_size, axis=0)[: self.q.shape[0]]

    def dequantize(self) -> np.ndarray:
        zero = 0 if self.zero is None else self.expanded(self.zero).astype(np.int64)
        return ((self.q.astype(np.int64) - zero) * self.expanded(self.scale)).astype(np.float32)


def is_signed_symmetric(dtype: str, symmetric: bool) -> bool:
    return symmetric and qmath.RANGES[dtype][0] < 0


def block_params(w: np.ndarray, block_size: int, dtype: str, symmetric: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale and zero point of every block of `w` [K, N]. The last block may be short: padding rows are
    zeros, which change nothing since every range is widened to include 0 anyway."""
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float64)
    padded[:k] = w
    view = padded.reshape(blocks, block_size, n)
    scale, zero = qmath.qparams(view.min(axis=1), view.max(axis=1), dtype, symmetric)
    return scale, None if is_signed_symmetric(dtype, symmetric) else zero


def quantize_blocks(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, block_size: int, dtype: str
) -> np.ndarray:
    """Codes of `w` [K, N] under given block parameters (round half to even, clipped to the type)."""
    k = w.shape[0]
    rows_scale = np.repeat(scale, block_size, axis=0)[:k]
    q = np.rint(w.astype(np.float32) / rows_scale).astype(np.int64)
    if zero is not None:
        q += np.repeat(zero.astype(np.int64), block_size, axis=0)[:k]
    qmin, qmax = qmath.RANGES[dtype]
    return np.clip(q, qmin, qmax).astype(qmath.NUMPY_STORAGE[dtype])


def rtn(w: np.ndarray, block_size: int, dtype: str, symmetric: bool, chunk_values: int = 1 << 20) -> BlockQuant:
    """Round to nearest, a slice of whole blocks (rows of `w`, about `chunk_values` weights) at a time:
    blocks are independent, so the result is the same, and the float64/int64 temporaries (~30 bytes per
    weight) stay near 30 MB instead of 2 GB for a 2048 × 32000 LM head. Row slices are contiguous in a
    memory-mapped weight, so each slice reads one stretch of the file."""
    k, n = w.shape
    rows = max(1, chunk_values // max(n * block_size, 1)) * block_size
    if rows >= k:
        scale, zero = block_params(w, block_size, dtype, symmetric)
        return BlockQuant(quantize_blocks(w, scale, zero, block_size, dtype), scale, zero, block_size, dtype)
    q = np.empty((k, n), dtype=qmath.NUMPY_STORAGE[dtype])
    scales, zeros = [], []
    for start in range(0, k, rows):
        part = w[start : start + rows]
        scale, zero = block_params(part, block_size, dtype, symmetric)
        q[start : start + rows] = quantize_blocks(part, scale, zero, block_size, dtype)
        scales.append(scale)
        zeros.append(zero)
    zero_all = None if zeros[0] is None else np.concatenate(zeros)  # type: ignore[arg-type]
    return BlockQuant(q, np.concatenate(scales), zero_all, block_size, dtype)


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """tr(ΔᵀHΔ) with Δ = Ŵ − W: the expected squared output error E‖x(Ŵ − W)‖² for inputs with E[xxᵀ] = H."""
    delta = (w_hat.astype(np.float64) - w).astype(np.float64)
    return float(np.sum((hessian @ delta) * delta))


def gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    block_size: int,
    dtype: str,
    symmetric: bool,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    lazy_batch: int = 128,
) -> BlockQuant:
    """GPTQ with block-wise parameters. Without `act_order` each block's scale is set from the weights as
    updated by the errors of earlier blocks (as in the reference code); with it, channels are visited by
    decreasing Hessian diagonal and the scales are fixed up front from the original weights ("static
    groups"), so the stored layout stays plain blocks with no index permutation."""
    k, n = w.shape
    weights = w.T.astype(np.float64)  # [N, K]: GPTQ's layout, one row per output
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weights[:, dead] = 0.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    weights = weights[:, order]
    h = h[np.ix_(order, order)]
    upper = _inverse_hessian_cholesky(h, damp)

    blocks = -(-k // block_size)
    if act_order:
        scale, zero = block_params(w, block_size, dtype, symmetric)
    else:
        scale = np.zeros((blocks, n), np.float32)
        zero = None if is_signed_symmetric(dtype, symmetric) else np.zeros((blocks, n), qmath.NUMPY_STORAGE[dtype])
    qmin, qmax = qmath.RANGES[dtype]
    codes = np.zeros((n, k), np.int64)
    lazy = max(block_size, lazy_batch // block_size * block_size)  # whole blocks per lazy batch
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        chunk = weights[:, start:stop].copy()
        errors = np.zeros_like(chunk)
        inv = upper[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if not act_order and column % block_size == 0:
                block = chunk[:, i : i + block_size].T  # this block's rows, with earlier errors applied
                s, z = qmath.qparams(block.min(axis=0), block.max(axis=0), dtype, symmetric)
                scale[column // block_size] = s
                if zero is not None:
                    zero[column // block_size] = z
            group = order[column] // block_size
            s = scale[group].astype(np.float64)
            z = 0 if zero is None else zero[group].astype(np.int64)
            q = np.clip(np.rint(chunk[:, i] / s) + z, qmin, qmax)
            codes[:, order[column]] = q
            err = (chunk[:, i] - (q - z) * s) / inv[i, i]
            chunk[:, i:] -= np.outer(err, inv[i, i:])
            errors[:, i] = err
        weights[:, stop:] -= errors @ upper[start:stop, stop:]
    storage = qmath.NUMPY_STORAGE[dtype]
    return BlockQuant(codes.T.astype(storage), scale, zero, block_size, dtype)


def _inverse_hessian_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H); damping grows until H is positive
    definite (a few calibration tokens can leave it singular)."""
    mean_diag = float(np.mean(np.diag(h))) or 1.0
    for attempt in range(6):
        damped = h + np.eye(len(h)) * damp * (10**attempt) * mean_diag
        try:
            inverse = np.linalg.inv(np.linalg.cholesky(damped))
            return np.linalg.cholesky(inverse.T @ inverse).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("the layer Hessian stays singular after damping; use more calibration data")


def awq_scales(
    w: np.ndarray, hessian: np.ndarray, block_size: int, dtype: str, symmetric: bool, grid: int = 20
) -> tuple[np.ndarray, float]:
    """Per-input-channel scales s [K] (weights × s, activation ÷ s) and the α chosen.

    a_k = sqrt(H_kk), the RMS of input channel k; s = a^α normalised to geometric mean 1 over its range.
    α = 0 returns all-ones scales (nothing to insert)."""
    rms = np.sqrt(np.maximum(np.diag(hessian), 0.0))
    rms = np.maximum(rms, rms.max() * 1e-4 if rms.max() > 0 else 1.0)
    best_alpha, best_error, best_scale = 0.0, np.inf, np.ones(w.shape[0])
    for alpha in np.linspace(0.0, 1.0, grid + 1):
        scale = rms**alpha
        scale /= np.sqrt(scale.max() * scale.min())
        scaled = w * scale[:, None]
        w_hat = rtn(scaled, block_size, dtype, symmetric).dequantize() / scale[:, None]
        error = output_error(w, w_hat, hessian)
        if error < best_error:
            best_alpha, best_error, best_scale = float(alpha), error, scale
    return best_scale, best_alpha


@dataclass(frozen=True)
class DoubleQuant:
    """Block scales as uint8 codes with one float32 scale per `super_block` codes along N."""

    codes: np.ndarray  # [blocks, N] uint8
    scale: np.ndarray  # [blocks, ceil(N / super_block)] float32
    super_block: int

    def dequantize(self) -> np.ndarray:
        rows = np.repeat(self.scale, self.super_block, axis=1)[:, : self.codes.shape[1]]
        return (self.codes.astype(np.float32) * rows).astype(np.float32)


def double_quantize(scale: np.ndarray, super_block: int = 256) -> DoubleQuant:
    """Scales are positive, so uint8 with zero point 0 spans [0, max] of each super-block."""
    blocks, n = scale.shape
    groups = -(-n // super_block)
    padded = np.zeros((blocks, groups * super_block), np.float64)
    padded[:, :n] = scale
    top = padded.reshape(blocks, groups, super_block).max(axis=2)
    second = np.where(top > 0, top / 255.0, 1.0).astype(np.float32)
    rows = np.repeat(second, super_block, axis=1)[:, :n]
    codes = np.clip(np.rint(scale / rows), 1, 255).astype(np.uint8)  # ≥ 1: a zero scale would erase a block
    return DoubleQuant(codes, second, super_block)
