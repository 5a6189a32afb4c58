"""Min-max calibration: in-graph reductions equal ranges computed from whole tensors; merging is exact."""

from __future__ import annotations

import numpy as np
import pytest
from builders import cnn_data, small_cnn
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from ort_util import run

from onnxq import ir as onnxq_ir
from onnxq.calibration.collectors import MinMaxCollector
from onnxq.calibration.readers import input_specs, rebatch
from onnxq.calibration.session import collect_ranges

NAMES = ["c1", "r1", "cat", "mp", "logits"]


def _reference_ranges(x: np.ndarray) -> dict[str, tuple[float, float]]:
    proto = small_cnn()
    for name in NAMES[:-1]:
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    outputs = run(proto, {"x": x})
    by_name = dict(zip(["logits", *NAMES[:-1]], outputs, strict=True))
    return {n: (float(by_name[n].min()), float(by_name[n].max())) for n in NAMES}


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_ranges_equal_whole_tensor_min_max(batch_size: int) -> None:
    x = cnn_data(37)
    model = onnxq_ir.from_proto(small_cnn())
    ranges, fingerprint = collect_ranges(
        model, NAMES, lambda: iter([{"x": x[:20]}, {"x": x[20:]}]), batch_size=batch_size
    )
    reference = _reference_ranges(x)
    for name in NAMES:
        assert ranges[name].min == pytest.approx(reference[name][0], rel=1e-5, abs=1e-6)
        assert ranges[name].max == pytest.approx(reference[name][1], rel=1e-5, abs=1e-6)
    assert len(fingerprint) == 16


def test_fixed_batch_model_is_fed_one_sample_at_a_time() -> None:
    model = onnxq_ir.from_proto(small_cnn(batch=1))
    chunks = list(rebatch(iter([{"x": cnn_data(5)}]), input_specs(model), batch_size=8))
    assert [c["x"].shape[0] for c in chunks] == [1] * 5
    ranges, _ = collect_ranges(model, ["r1"], lambda: iter([{"x": cnn_data(5)}]))
    assert ranges["r1"].min == 0.0


batches = st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), min_size=1, max_size=8)


@given(batches, batches)
def test_merge_equals_collecting_everything(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> None:
    def collect(pairs: list[tuple[float, float]]) -> MinMaxCollector:
        collector = MinMaxCollector()
        for lo, hi in pairs:
            collector.update("t", {"min": np.float32(min(lo, hi)), "max": np.float32(max(lo, hi))})
        return collector

    merged = collect(a).merge(collect(b)).result()["t"]
    whole = collect(a + b).result()["t"]
    assert (merged.min, merged.max) == (whole.min, whole.max)
