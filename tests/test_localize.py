"""Validation that finds where accuracy went: per-slice metrics catch a collapsed head slice that the
whole-output metric misses, localization blames the shared-scale Concat, the what-if recovers it, and the
realization check agrees with onnxruntime's optimized graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import box_score_head
from ort_util import optimized_op_counts

import onnxq
from onnxq.calibration.readers import input_specs
from onnxq.localize import INTEGER_KERNELS, keep_float, localize, realization
from onnxq.recipe import Gates
from onnxq.validate import validate_models


def _data(n: int, seed: int):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(seed).standard_normal((n, 1, 3, 8, 8)).astype(np.float32)
    return lambda: iter({"x": sample} for sample in x)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("head")
    source, calib = tmp / "head.onnx", tmp / "calib.npz"
    onnx.save(box_score_head(), source)
    np.savez(calib, x=np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32))
    # one scale for the Concat's inputs and output, as onnxruntime's quantizer and many exporters do
    overrides = ["passes.insert_qdq.share_concat_scale=true"]
    out = onnxq.run(source, "int8", calib=str(calib), output=tmp / "q.onnx", overrides=overrides, validate=False).output
    return source, out


def test_the_slice_metric_flags_what_the_whole_output_misses(head: tuple[Path, Path]) -> None:
    source, quantized = head
    specs = input_specs(onnxq.ir.load(source))
    (result,) = validate_models(source, quantized, _data(16, 1), specs, gates=Gates(min_sqnr_db=10.0))
    (output,) = result.outputs
    assert output.cosine > 0.999 and output.sqnr_db > 20  # the whole output looks fine
    assert output.slices is not None and output.slices.worst_index == 4  # the score channel
    assert output.slices.worst_sqnr_db < 5, output.slices
    gates = {g.gate.split(" ")[0]: g.passed for g in result.gates}
    assert gates == {"min_sqnr_db": True, "min_slice_sqnr_db": False}  # 10 dB per slice is the default gate


def test_localization_blames_the_shared_scale_concat_and_the_whatif_recovers(head: tuple[Path, Path]) -> None:
    source, quantized = head
    specs = input_specs(onnxq.ir.load(source))
    found = localize(source, quantized, _data(16, 1), specs)
    assert found.nodes[0].name == "head_concat", [(n.name, round(n.drop_db, 1)) for n in found.nodes]
    assert found.nodes[0].drop_db > 20
    fixed, unchanged = keep_float(onnx.load(quantized), found.top(1))
    assert unchanged == []
    (result,) = validate_models(source, fixed.SerializeToString(), _data(16, 1), specs, gates=Gates())
    assert result.outputs[0].slices.worst_sqnr_db > 25, result.outputs[0].slices  # type: ignore[union-attr]
    assert result.passed


def test_realization_counts_match_the_optimized_graph(head: tuple[Path, Path]) -> None:
    _, quantized = head
    found = realization(quantized)
    ops = optimized_op_counts(quantized)
    assert found.integer_kernels == {op: n for op, n in ops.items() if op in INTEGER_KERNELS}
    assert found.integer_kernels.get("QLinearConv") == 2
    assert found.fallbacks == []


def test_realization_reports_a_dequantized_weight_feeding_a_float_conv(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.int8), "w_q")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "w_s")
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"]),
            helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
        ],
        "weight_only_int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        initializer=[w, s],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    found = realization(model)
    assert found.integer_kernels == {} and sum(found.float_compute.values()) == 1
    assert len(found.fallbacks) == 1 and "one input" in found.fallbacks[0]["reason"], found
