"""A streaming histogram whose range grows without losing counts, and that merges exactly.

Bins lie on a global grid of width w = 2^e anchored at 0: bin k covers [k·w, (k+1)·w). When new data
need more than `max_bins` bins, w doubles and pairs of bins merge exactly (the grid stays aligned).
Because w is always the smallest power of two whose grid span of everything seen fits in `max_bins`,
collecting a then b, b then a, or merging separate histograms of a and b give identical counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SMALLEST_EXPONENT = -60  # width 2^-60: an all-zero tensor still gets a valid (tiny) grid


@dataclass
class StreamingHistogram:
    max_bins: int = 2048
    exponent: int | None = None  # w = 2^exponent
    start: int = 0  # grid index of counts[0]
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    min: float = math.inf
    max: float = -math.inf

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent if self.exponent is not None else SMALLEST_EXPONENT)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def edges(self) -> np.ndarray:
        return (self.start + np.arange(len(self.counts) + 1)) * self.width

    def _span(self, lo: float, hi: float, exponent: int) -> tuple[int, int]:
        w = math.ldexp(1.0, exponent)
        return math.floor(lo / w), math.floor(hi / w)

    def _fit_exponent(self, lo: float, hi: float) -> int:
        """Smallest exponent (≥ the current one) whose grid span of [lo, hi] fits in max_bins."""
        exponent = self.exponent if self.exponent is not None else SMALLEST_EXPONENT
        if self.exponent is None:
            # Start from the span, but never so fine that |x| / w leaves int64 (a constant tensor has no span).
            magnitude = max(abs(lo), abs(hi))
            from_span = math.frexp((hi - lo) / self.max_bins)[1] - 1 if hi > lo else SMALLEST_EXPONENT
            from_magnitude = math.frexp(magnitude)[1] - 40 if magnitude > 0 else SMALLEST_EXPONENT
            exponent = max(SMALLEST_EXPONENT, from_span, from_magnitude)
        while True:
            first, last = self._span(lo, hi, exponent)
            if last - first + 1 <= self.max_bins:
                return exponent
            exponent += 1

    def _coarsen(self, exponent: int) -> None:
        """Re-bin to width 2^exponent: grid index k becomes k >> shift (floor), so counts merge exactly."""
        if self.exponent is None:
            self.exponent = exponent
            return
        shift = exponent - self.exponent
        if shift <= 0:
            return
        if len(self.counts):
            index = (self.start + np.arange(len(self.counts))) >> shift
            new_start = int(index[0])
            self.counts = np.bincount(index - new_start, weights=self.counts, minlength=0).astype(np.int64)
            self.start = new_start
        self.exponent = exponent

    def _ensure(self, first: int, last: int) -> None:
        """Extend the counts array to cover grid indices first..last."""
        if not len(self.counts):
            self.start, self.counts = first, np.zeros(last - first + 1, dtype=np.int64)
            return
        end = self.start + len(self.counts) - 1
        if first < self.start:
            self.counts = np.concatenate([np.zeros(self.start - first, np.int64), self.counts])
            self.start = first
        if last > end:
            self.counts = np.concatenate([self.counts, np.zeros(last - end, np.int64)])

    def update(self, values: np.ndarray, lo: float | None = None, hi: float | None = None) -> None:
        """Count `values`; `lo`/`hi` are the exact extremes when `values` is a subsample of the tensor."""
        values = np.asarray(values, dtype=np.float64).ravel()
        if values.size == 0 and lo is None:
            return
        data_lo = float(values.min()) if values.size else math.inf
        data_hi = float(values.max()) if values.size else -math.inf
        lo = min(data_lo, lo if lo is not None else math.inf)
        hi = max(data_hi, hi if hi is not None else -math.inf)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        exponent = self._fit_exponent(self.min, self.max)
        self._coarsen(exponent)
        first, last = self._span(self.min, self.max, self.exponent)  # type: ignore[arg-type]
        self._ensure(first, last)
        if values.size:
            index = np.floor(values / self.width).astype(np.int64) - self.start
            self.counts += np.bincount(index, minlength=len(self.counts))[: len(self.counts)]

    def merge(self, other: StreamingHistogram) -> StreamingHistogram:
        merged = StreamingHistogram(self.max_bins, self.exponent, self.start, self.counts.copy(), self.min, self.max)
        if other.exponent is None:
            return merged
        incoming = StreamingHistogram(
            other.max_bins, other.exponent, other.start, other.counts.copy(), other.min, other.max
        )
        lo, hi = min(merged.min, incoming.min), max(merged.max, incoming.max)
        exponent = max(
            merged._fit_exponent(lo, hi) if merged.exponent is not None else other.exponent,
            incoming._fit_exponent(lo, hi),
        )
        for part in (merged, incoming):
            part._coarsen(exponent)
            part.min, part.max = lo, hi
            part._ensure(*part._span(lo, hi, exponent))
        offset = incoming.start - merged.start
        merged.counts[offset : offset + len(incoming.counts)] += incoming.counts
        return merged

    # --- thresholds ------------------------------------------------------------------------------------

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the counts lie, at bin resolution (clamped to min/max)."""
        cumulative = np.cumsum(self.counts)
        if not len(cumulative) or cumulative[-1] == 0:
            return 0.0
        target = q * cumulative[-1]
        index = int(np.searchsorted(cumulative, target, side="left"))
        index = min(index, len(self.counts) - 1)
        edge_hi = (self.start + index + 1) * self.width
        edge_lo = (self.start + index) * self.width
        value = edge_hi if q >= 0.5 else edge_lo
        return float(min(max(value, self.min), self.max))

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """Counts of |x| on bins [k·w, (k+1)·w), k ≥ 0, at most max_bins of them.

        The grid is symmetric about 0, so folding negative bins is exact; the width is first coarsened
        (on a copy) until [0, max|x|] fits in max_bins.
        """
        folded = StreamingHistogram(self.max_bins, self.exponent, self.start, self.counts.copy(), self.min, self.max)
        magnitude = max(abs(self.min), abs(self.max))
        exponent = folded._fit_exponent(0.0, magnitude) if folded.exponent is not None else SMALLEST_EXPONENT
        while math.floor(magnitude / math.ldexp(1.0, exponent)) + 1 > self.max_bins:
            exponent += 1
        folded._coarsen(exponent)
        index = folded.start + np.arange(len(folded.counts))
        index = np.where(index >= 0, index, -index - 1)
        return np.bincount(index, weights=folded.counts).astype(np.int64), folded.width
