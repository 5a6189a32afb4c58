"""`--calib synthetic` on a decoder with a KV cache: feeds a prefill the attention accepts (empty past, a mask of
ones over the new tokens, counting positions), not zeros everywhere with every symbolic dim at 32."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper
from ort_util import run

from onnxq import ir as onnxq_ir
from onnxq.calibration.readers import SyntheticReader, input_specs


def _decoder_step() -> onnx.ModelProto:
    """present = Concat(past, new keys) on the sequence axis; the mask must cover past + new tokens, and the
    positions must count, else the Mul refuses the shapes or the check output is nonzero."""
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "axes13"], ["ids_4d"]),  # [B, 1, S, 1]
        helper.make_node("Expand", ["ids_4d", "kv_shape"], ["new_k"]),
        helper.make_node("Concat", ["past_key_values.0.key", "new_k"], ["present.0.key"], axis=2),
        helper.make_node("ReduceSum", ["present.0.key", "axes13"], ["scores"], keepdims=0),  # [B, P+S]
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["scores", "mask_f"], ["logits"]),
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["mask_f", "axis1"], ["total"], keepdims=1),  # tokens attended: P + S
        helper.make_node("ReduceMax", ["pos_f", "axis1"], ["last"], keepdims=1),
        helper.make_node("Sub", ["total", "last"], ["gap"]),  # 1 when positions count 0…S−1 over an empty past
    ]
    inits = [
        helper.make_tensor("axes13", TensorProto.INT64, [2], [1, 3]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("kv_shape", TensorProto.INT64, [4], [1, 2, 1, 4]),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder_step",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 2, "past", 4]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("gap", TensorProto.FLOAT, None),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_synthetic_feeds_are_a_consistent_prefill() -> None:
    model = _decoder_step()
    specs = input_specs(onnxq_ir.from_proto(model))
    feeds = next(iter(SyntheticReader(specs, num_samples=1)))
    assert feeds["past_key_values.0.key"].shape == (1, 2, 0, 4)
    assert np.all(feeds["attention_mask"] == 1) and feeds["attention_mask"].shape == (1, 32)
    assert feeds["position_ids"].tolist() == [list(range(32))]
    logits, present, gap = run(model, feeds)
    assert logits.shape == (1, 32) and present.shape == (1, 2, 32, 4)
    assert gap.item() == 1.0
