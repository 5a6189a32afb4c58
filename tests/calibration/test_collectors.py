"""Every collector: merge(a, b) equals collecting a + b; thresholds within one bin of all-data references."""

from __future__ import annotations

import numpy as np
import pytest
from builders import cnn_data, small_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper
from ort_util import run

from onnxq import ir as onnxq_ir
from onnxq.calibration.collectors import COLLECTORS, EntropyCollector, PercentileCollector, kl_threshold_bins
from onnxq.calibration.session import collect_ranges, make_collector

values = arrays(np.float32, st.integers(1, 400), elements=st.floats(-50, 50, width=32))
batches = st.lists(values, min_size=1, max_size=4)


def _feed(collector, parts: list[np.ndarray]):  # type: ignore[no-untyped-def]
    for part in parts:
        reduced = {
            "min": part.min(),
            "max": part.max(),
            "sample": part,
            "channel_absmax": np.abs(part[: part.size // 2 * 2]).reshape(-1, 2).max(axis=0, initial=0.0),
            "gram": np.outer(part[:2], part[:2]) if part.size >= 2 else np.zeros((2, 2), np.float32),
            "rows": np.array([1], np.int64),
        }
        collector.update("t", reduced)
    return collector


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(COLLECTORS)), batches, batches)
def test_merge_equals_collecting_everything(method: str, a: list[np.ndarray], b: list[np.ndarray]) -> None:
    settings_ = {"bins": 256}
    merged = _feed(make_collector(method, settings_), a).merge(_feed(make_collector(method, settings_), b))
    whole = _feed(make_collector(method, settings_), a + b)
    merged_result, whole_result = merged.result(), whole.result()
    assert merged_result.keys() == whole_result.keys()
    for name, got in merged_result.items():
        if method == "channel_absmax":  # arrays of per-channel maxima
            np.testing.assert_array_equal(got, whole_result[name])
        elif method == "gram":  # float64 sums in another order
            np.testing.assert_allclose(got, whole_result[name], rtol=1e-12, atol=1e-9)
        else:
            assert got == whole_result[name]


@settings(max_examples=60, deadline=None)
@given(batches, st.sampled_from([99.0, 99.9, 99.99]))
def test_percentile_within_one_bin_of_all_data(parts: list[np.ndarray], percentile: float) -> None:
    collector = _feed(PercentileCollector(percentile=percentile), parts)
    data = np.concatenate(parts).astype(np.float64)
    width = collector.hists["t"].width
    got = collector.result()["t"]
    high = float(np.quantile(data, percentile / 100, method="inverted_cdf"))
    low = float(np.quantile(data, 1 - percentile / 100, method="inverted_cdf"))
    assert abs(got.max - max(high, 0.0)) <= width * 1.0001
    assert abs(got.min - min(low, 0.0)) <= width * 1.0001


@settings(max_examples=40, deadline=None)
@given(batches)
def test_entropy_threshold_within_one_bin_of_all_data(parts: list[np.ndarray]) -> None:
    collector = _feed(EntropyCollector(max_clipped=1.0), parts)  # pure KL: no floor on the threshold
    hist = collector.hists["t"]
    _, width = hist.abs_histogram()
    signed = np.concatenate(parts).astype(np.float64)
    # the grid bins are half-open [k·w, (k+1)·w): folded negatives land just below an exact edge
    data = np.where(signed < 0, np.nextafter(-signed, 0), signed)
    edges = np.arange(0, np.floor(data.max() / width) + 2) * width
    reference_counts, _ = np.histogram(data, bins=edges)
    levels = 255 if hist.min >= -0.1 * max(hist.max, 0.0) else 128
    reference = kl_threshold_bins(reference_counts, levels) * width
    got = collector.result()["t"]
    assert abs(min(hist.max, reference) - got.max) <= width * 1.0001


def test_entropy_keeps_the_tail_of_a_bimodal_tensor() -> None:
    rng = np.random.default_rng(0)
    bulk = rng.uniform(-0.04, 0.04, 97_700)
    tail = rng.uniform(0.05, 0.4, 2_300)
    collector = _feed(EntropyCollector(), [np.concatenate([bulk, tail]).astype(np.float32)])
    assert collector.result()["t"].max > 0.35


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_methods_through_onnxruntime(method: str) -> None:
    """In-graph sampling (all elements here) gives the same percentile as numpy on whole tensors."""
    x = cnn_data(24)
    model = onnxq_ir.from_proto(small_cnn())
    names = ["r1", "cat", "logits"]
    ranges, _ = collect_ranges(
        model, names, lambda: iter([{"x": x}]), method=method, sample_per_tensor=0, exact=frozenset({"logits"})
    )
    proto = small_cnn()
    for name in names[:-1]:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    outputs = dict(zip(["logits", *names[:-1]], run(proto, {"x": x}), strict=True))
    assert ranges["logits"].min == pytest.approx(float(outputs["logits"].min()))
    assert ranges["logits"].max == pytest.approx(float(outputs["logits"].max()))
    for name in names[:-1]:
        assert 0 <= ranges[name].max <= float(outputs[name].max()) + 1e-6
    if method == "percentile":
        collector = PercentileCollector()
        width = None
        for name in names[:-1]:
            data = outputs[name].astype(np.float64).ravel()
            collector.update(name, {"min": data.min(), "max": data.max(), "sample": data})
            width = collector.hists[name].width
            exact = float(np.quantile(data, 0.9999, method="inverted_cdf"))
            assert abs(ranges[name].max - exact) <= width * 1.0001


def test_sampling_caps_the_elements_shipped_per_tensor() -> None:
    from onnxq.calibration.session import augmented_model
    from onnxq.ort_session import session as open_session

    model = onnxq_ir.from_proto(small_cnn())
    session = open_session(augmented_model(model, ["r1"], ("sample",), sample_per_tensor=100).SerializeToString())
    (sample,) = session.run(["r1__onnxq_sample"], {"x": cnn_data(4)})
    total = 4 * 8 * 8 * 8
    assert 100 >= sample.size >= total // -(-total // 100)


@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_sharded_collection_equals_one_process(method: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from onnxq.calibration.readers import input_specs, open_data

    model = onnxq_ir.from_proto(small_cnn())
    names = ["r1", "cat", "logits"]
    data = open_data("synthetic", input_specs(model), num_samples=12, seed=3)
    single, _ = collect_ranges(model, names, data, method=method)
    in_processes, _ = collect_ranges(model, names, data, method=method, workers=2)
    with ThreadPoolExecutor(3) as pool:  # any concurrent.futures.Executor plugs in (a cluster's too)
        pluggable, _ = collect_ranges(model, names, data, method=method, workers=3, executor=pool)
    assert single == in_processes == pluggable
