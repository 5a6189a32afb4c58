"""The streaming histogram: exact merging, range growth without loss, quantiles within one bin."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnxq.calibration.histogram import StreamingHistogram

values = arrays(np.float32, st.integers(1, 300), elements=st.floats(-1e3, 1e3, width=32))
chunks = st.lists(values, min_size=1, max_size=5)


def collect(parts: list[np.ndarray], bins: int = 64) -> StreamingHistogram:
    hist = StreamingHistogram(max_bins=bins)
    for part in parts:
        hist.update(part)
    return hist


@settings(max_examples=200)
@given(chunks, chunks)
def test_merge_equals_collecting_everything(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    merged = collect(a).merge(collect(b))
    whole = collect(a + b)
    assert (merged.exponent, merged.start, merged.min, merged.max) == (
        whole.exponent,
        whole.start,
        whole.min,
        whole.max,
    )
    np.testing.assert_array_equal(np.trim_zeros(merged.counts), np.trim_zeros(whole.counts))
    assert merged.total == sum(p.size for p in a + b)


@given(chunks)
def test_every_value_is_counted_once_inside_its_bin(parts: list[np.ndarray]) -> None:
    hist = collect(parts)
    data = np.concatenate(parts).astype(np.float64)
    assert hist.total == data.size and len(hist.counts) <= 64
    reference, _ = np.histogram(data, bins=hist.edges())
    # np.histogram closes the last bin on the right; ours is half-open on a grid that always covers max
    assert abs(int(reference.sum()) - data.size) <= int(np.sum(data == hist.edges()[-1]))


@given(chunks, st.sampled_from([0.5, 0.9, 0.99, 0.999, 0.01]))
def test_quantile_within_one_bin_of_numpy_on_all_data(parts: list[np.ndarray], q: float) -> None:
    hist = collect(parts, bins=2048)
    exact = float(np.quantile(np.concatenate(parts).astype(np.float64), q, method="inverted_cdf"))
    assert abs(hist.quantile(q) - exact) <= hist.width * 1.0001


def test_subsampled_values_keep_the_exact_extremes() -> None:
    hist = StreamingHistogram(max_bins=128)
    hist.update(np.array([0.5, 1.0]), lo=-3.0, hi=7.0)
    assert (hist.min, hist.max) == (-3.0, 7.0) and hist.total == 2


def test_abs_histogram_folds_negative_bins_exactly() -> None:
    hist = collect([np.array([-1.3, -0.3, 0.3, 1.3, 1.3])], bins=16)
    counts, width = hist.abs_histogram()
    assert counts.sum() == 5
    assert counts[int(1.3 // width)] == 3 and counts[int(0.3 // width)] == 2
