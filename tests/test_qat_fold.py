"""fold_qat on real torch exports of the QAT digits CNN (models/digits/qat, made by qat_train.py): every
input form folds to a model that computes what PyTorch's fake-quant model computed, with integer weights
only, and runs on onnxruntime's integer kernels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxq
from onnxq import qmath
from onnxq.localize import realization

REPO = Path(__file__).resolve().parents[1]
QAT = REPO / "models" / "digits" / "qat"
DIGITS = REPO / "models" / "digits"
TORCH = {k: v["torch_fake_quant_acc"] for k, v in json.loads((QAT / "results.json").read_text())["variants"].items()}
FORMS = {
    "digits_qat_int8_qdq": [],  # TorchScript Q/DQ, zero points behind Identity nodes
    "digits_qat_int4_qdq": [],  # Q → Clip(-7, 7) → DQ on the weights
    "digits_qat_int8_dynamo": [],  # dynamo Q/DQ
    "digits_lsq_int8": [f"passes.fold_qat.sidecar={QAT / 'digits_lsq_int8.json'}"],  # float model + sidecar
    "digits_lsq_int4": [f"passes.fold_qat.sidecar={QAT / 'digits_lsq_int4.json'}"],  # 4-bit codes, int8 storage
}


def _accuracy(model: Path) -> float:
    """As written (no fusion): the reference semantics, which PyTorch's fake quantization also has."""
    data = np.load(DIGITS / "eval.npz")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    logits = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": data["input"]}
    )[0]
    return float(np.mean(np.argmax(logits, axis=1) == data["label"]))


def _fold(tmp: Path, name: str) -> Path:
    calib = str(DIGITS / "calib.npz")
    return onnxq.run(
        QAT / f"{name}.onnx", "qat", calib=calib, output=tmp / f"{name}.onnx", overrides=FORMS[name], validate=False
    ).output


@pytest.mark.parametrize("name", list(FORMS))
def test_every_export_folds_to_integer_weights_with_trainings_accuracy(tmp_path: Path, name: str) -> None:
    folded = _fold(tmp_path, name)
    model = onnx.load(folded)
    onnx.checker.check_model(model, full_check=True)
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2}
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert not [n.name for n in compute if n.input[1] in floats]  # no float weight feeds a compute op
    assert abs(_accuracy(folded) - TORCH[name]) <= 0.002 + 1e-9, (_accuracy(folded), TORCH[name])
    kernels = realization(folded).integer_kernels
    assert kernels.get("QLinearConv", 0) == 4 and kernels.get("QGemm", 0) == 1, kernels


def test_the_decomposed_straight_through_form_is_restored(tmp_path: Path) -> None:
    """digits_lsq_int8_dynamo: fake quantization traced as Div/Round/Sub/Add/Clip/Mul (the STE written
    out); the exporter folded 4 of 5 weights onto their grids already, so those are quantized as PTQ."""
    folded = _fold_with(tmp_path, "digits_lsq_int8_dynamo")
    ops = [n.op_type for n in onnx.load(folded).graph.node]
    assert "Round" not in ops and "Div" not in ops
    assert _accuracy(folded) >= TORCH["digits_lsq_int8_dynamo"] - 0.002


def _fold_with(tmp: Path, name: str) -> Path:
    calib = str(DIGITS / "calib.npz")
    return onnxq.run(QAT / f"{name}.onnx", "qat", calib=calib, output=tmp / f"{name}.onnx", validate=False).output


def test_fold_twice_and_int8_on_the_folded_model_change_nothing(tmp_path: Path) -> None:
    folded = _fold(tmp_path, "digits_qat_int8_qdq")
    again = onnxq.run(folded, {"passes": [{"fold_qat": {}}]}, output=tmp_path / "again.onnx", validate=False)
    assert [p.modified for p in again.passes] == [False]
    calib = str(DIGITS / "calib.npz")
    int8 = onnxq.run(folded, "int8", calib=calib, output=tmp_path / "int8.onnx", validate=False).output
    count = [sum(n.op_type == "QuantizeLinear" for n in onnx.load(p).graph.node) for p in (folded, int8)]
    assert count[0] == count[1]  # nothing quantized twice
    x = np.load(DIGITS / "eval.npz")["input"][:64]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = (ort.InferenceSession(str(p), options).run(None, {"input": x})[0] for p in (folded, int8))
    assert qmath.sqnr_db(a, b) >= 60
