"""Exact attention rewrites: key and value biases folded away (simplify), the output projection's
SmoothQuant scale folded into the value projection (smooth_quant), and the cases they must refuse."""

from __future__ import annotations

import numpy as np
import pytest
from builders import attention_feeds, bert_attention
from ort_util import run

from onnxq import ir as onnxq_ir
from onnxq.pass_base import PassContext
from onnxq.passes import Simplify, SmoothQuant


def _outputs(model, feeds):  # type: ignore[no-untyped-def]
    return np.concatenate([run(model, f)[0] for f in feeds])


def _adds(model) -> int:  # type: ignore[no-untyped-def]
    return sum(n.op_type == "Add" for n in model.graph)


@pytest.mark.parametrize("fused_qkv", [False, True], ids=["separate", "fused-qkv-split"])
def test_key_and_value_biases_fold_away_exactly(fused_qkv: bool) -> None:
    proto = bert_attention(fused_qkv=fused_qkv)
    model = onnxq_ir.from_proto(proto)
    context = PassContext()
    Simplify({}, context)(model)
    assert _adds(onnxq_ir.from_proto(proto)) - _adds(model) == 2  # K bias and V bias; Q and output biases stay
    names = {n.name for n in model.graph}
    assert "attention.self.k/Add" not in names and "attention.self.v/Add" not in names
    assert "attention.self.q/Add" in names
    assert any("2 attention bias Adds" in note for note in context.notes)
    feeds = attention_feeds(6, seed=1)
    np.testing.assert_allclose(_outputs(model, feeds), _outputs(proto, feeds), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "variant", [{"softmax_axis": 2}, {"value_perm": (0, 2, 3, 1)}], ids=["softmax-not-over-keys", "value-transposed"]
)
def test_attention_that_is_not_a_clean_head_split_keeps_its_biases(variant: dict) -> None:  # type: ignore[type-arg]
    proto = bert_attention(**variant)
    model = onnxq_ir.from_proto(proto)
    Simplify()(model)
    kept = {n.name for n in model.graph}
    if "softmax_axis" in variant:  # neither bias may move when softmax runs over queries
        assert {"attention.self.k/Add", "attention.self.v/Add"} <= kept
    else:  # Kᵀ is still clean: only the value side is refused
        assert "attention.self.v/Add" in kept and "attention.self.k/Add" not in kept


def _smooth(model, feeds):  # type: ignore[no-untyped-def]
    context = PassContext(calibration_data=lambda: iter(feeds))
    SmoothQuant({"alpha": 0.7}, context)(model)
    return context


def test_a_value_from_a_fused_projection_keeps_the_output_projections_smoothing_mul() -> None:
    """With V a Split output there is no value weight to rescale: the Mul stays, and the result is exact."""
    proto = bert_attention(fused_qkv=True)
    feeds = attention_feeds(8, seed=4)
    model = onnxq_ir.from_proto(proto)
    Simplify()(model)
    _smooth(model, feeds)
    muls = sorted(n.inputs[0].name for n in model.graph if n.op_type == "Mul" and n.name.endswith("_smooth"))
    assert muls == ["merged", "x"]
    np.testing.assert_allclose(_outputs(model, feeds), _outputs(proto, feeds), rtol=1e-4, atol=1e-4)


def test_output_projection_smoothing_folds_into_the_value_projection() -> None:
    proto = bert_attention()
    feeds = attention_feeds(8, seed=2)
    model = onnxq_ir.from_proto(proto)
    Simplify()(model)
    _smooth(model, feeds)
    muls = [n for n in model.graph if n.op_type == "Mul" and n.name.endswith("_smooth")]
    assert [m.inputs[0].name for m in muls] == ["x"]  # the projections' input only; the merged heads need none
    o_proj = next(n for n in model.graph if n.name == "attention.output.dense/MatMul")
    assert o_proj.inputs[0].producer().op_type == "Reshape"
    np.testing.assert_allclose(_outputs(model, feeds), _outputs(proto, feeds), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("insert_mul", ["never", "after_norm"])
def test_smoothing_without_a_mul_keeps_only_the_free_folds(insert_mul: str) -> None:
    """The block's projections read a graph input (no normalization): only the output projection smooths."""
    proto = bert_attention()
    feeds = attention_feeds(8, seed=3)
    model = onnxq_ir.from_proto(proto)
    Simplify()(model)
    context = PassContext(calibration_data=lambda: iter(feeds))
    SmoothQuant({"alpha": 0.7, "insert_mul": insert_mul}, context)(model)
    assert not [n for n in model.graph if n.op_type == "Mul" and n.name.endswith("_smooth")]
    assert context.notes == ["smooth_quant: smoothed 1 activations (alpha 0.7; 1/s into value projection 1)"]
    np.testing.assert_allclose(_outputs(model, feeds), _outputs(proto, feeds), rtol=1e-4, atol=1e-4)
