"""A decoder's KV-cache outputs are measured and reported, but the gates judge the logits by default."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxq.calibration.readers import InputSpec
from onnxq.recipe import Gates
from onnxq.validate import validate_models


def _decoder_step(noise: float) -> bytes:
    """x → logits (x·W) and present.0.key (x·K, plus `noise` in the copy that plays the quantized model)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (8, 16)).astype(np.float32)
    k = rng.normal(0, 1, (8, 8)).astype(np.float32)
    k_noisy = (k + noise * rng.normal(0, 1, k.shape)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("MatMul", ["x", "k"], ["present.0.key"])],
        "step",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["N", 8]),
        ],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(k_noisy, "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model.SerializeToString()


def _gates(ignore: list[str] | None) -> dict[str, tuple[float, bool]]:
    x = np.random.default_rng(1).normal(0, 1, (16, 8)).astype(np.float32)
    specs = [InputSpec("x", np.dtype(np.float32), (None, 8))]
    gates = Gates(min_sqnr_db=20.0) if ignore is None else Gates(min_sqnr_db=20.0, ignore_outputs=ignore)
    (result,) = validate_models(_decoder_step(0.0), _decoder_step(1.0), lambda: iter([{"x": x}]), specs, gates=gates)
    assert {o.name for o in result.outputs} == {"logits", "present.0.key"}  # both measured and reported
    return {g.gate: (g.value, g.passed) for g in result.gates}


def test_cache_outputs_are_not_gated_by_default() -> None:
    value, passed = _gates(None)["min_sqnr_db"]
    assert passed and value == float("inf")  # the logits are untouched; the broken cache is not judged


def test_cache_outputs_are_gated_when_asked() -> None:
    value, passed = _gates([])["min_sqnr_db"]
    assert not passed and value < 5
