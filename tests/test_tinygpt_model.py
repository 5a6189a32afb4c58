"""The committed tinygpt model and texts: a valid graph that onnxruntime runs, and a trained one.

Perplexity is the metric weight-only quantization is judged by, so it must be one that a trained model
reaches and a broken one does not: fp32 measures 4.26 on these 64 windows (uniform guessing is 256).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import tinygpt  # noqa: E402

MEASURED_PPL = 4.26  # models/tinygpt_train.py's model on make_windows(eval_text(), 128, 64)
N_WINDOWS = 64


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return onnx.load(tinygpt.MODEL_PATH)


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return tinygpt.make_windows(tinygpt.eval_text(), tinygpt.MAX_CONTEXT, N_WINDOWS)


def test_graph_is_valid_opset17_ir8_with_weights_inside(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert {o.domain: o.version for o in model.opset_import}.get("") == 17
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert tinygpt.MODEL_PATH.stat().st_size < 5 * 2**20


def test_inputs_outputs_and_named_weight_matmuls(model: onnx.ModelProto) -> None:
    sess = tinygpt.session(tinygpt.MODEL_PATH)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, len(inp.shape)) == ("input_ids", "tensor(int64)", 2)
    assert (out.name, out.type, out.shape[-1]) == ("logits", "tensor(float)", 256)
    assert all(isinstance(d, str) for d in inp.shape)  # dynamic batch and sequence
    (logits,) = sess.run(None, {"input_ids": np.zeros((3, 17), np.int64)})
    assert logits.shape == (3, 17, 256) and logits.dtype == np.float32

    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    weights = {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    assert len(weights) == 4 * 6 + 1
    assert weights["blocks.0.mlp.fc1/MatMul"] == (128, 512)
    assert weights["blocks.3.mlp.fc2/MatMul"] == (512, 128)
    assert weights["lm_head/MatMul"] == (128, 256)
    assert all(shape[0] % 128 == 0 for shape in weights.values())  # block-quantizable reduction dims


def test_texts_are_committed_and_feeds_have_the_model_shape() -> None:
    ev, cal = tinygpt.eval_text(), tinygpt.calib_text()
    assert 32_000 < len(ev) <= 65_536 and 32_000 < len(cal) <= 65_536
    assert ev[:2000] != cal[:2000]
    assert tinygpt.decode(tinygpt.encode("é\n")) == "é\n"
    feeds = tinygpt.calibration_feeds(8, 64)
    assert len(feeds) == 8 and all(f["input_ids"].shape == (1, 64) for f in feeds)
    assert feeds[0]["input_ids"].dtype == np.int64


def test_perplexity_shows_a_trained_model(windows: np.ndarray) -> None:
    ppl = tinygpt.perplexity(tinygpt.MODEL_PATH, windows)
    assert ppl < 1.3 * MEASURED_PPL, ppl
    assert ppl > 0.7 * MEASURED_PPL, ppl  # far lower would mean eval text leaked into training
    one_by_one = tinygpt.perplexity(tinygpt.MODEL_PATH, windows[:4], batch=1)
    assert one_by_one == pytest.approx(tinygpt.perplexity(tinygpt.MODEL_PATH, windows[:4]), rel=1e-5)


def test_shuffled_weights_are_far_worse(model: onnx.ModelProto, windows: np.ndarray) -> None:
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    rng = np.random.default_rng(0)
    for init in broken.graph.initializer:
        if init.name.endswith(".weight_t"):
            w = numpy_helper.to_array(init).copy()
            rng.shuffle(w.reshape(-1))
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    ppl = tinygpt.perplexity(broken.SerializeToString(), windows[:16])
    assert ppl > 3 * MEASURED_PPL, ppl
