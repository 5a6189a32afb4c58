"""Real shipped models (PP-OCR from the rapidocr-onnxruntime wheel): int8 with no hand fixes, run in onnxruntime.

These models keep weights in Constant nodes, use opset 11/12 and dynamic shapes: the things that break
other quantizers. Thresholds sit below what bench/vs_ort.py measures (onnxruntime's own quantizer gets
less on each), so a regression in placement or calibration fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from onnxq import qmath

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import ppocr, zoo  # noqa: E402

pytestmark = pytest.mark.slow


def _outputs(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


@pytest.mark.parametrize(
    ("name", "n_calib", "n_eval"), [("ppocr_cls", 32, 32), ("ppocr_rec", 32, 32), ("ppocr_det", 8, 6)]
)
def test_ppocr_quantizes_with_int8_and_keeps_its_task(tmp_path: Path, name: str, n_calib: int, n_eval: int) -> None:
    import onnxq

    source = zoo.fetch(name)
    before = zoo._sha256(source)
    calib = ppocr.make_npz(name, n_calib, tmp_path / "calib.npz", seed=0)
    result = onnxq.run(source, "int8", calib=str(calib), output=tmp_path / "q.onnx", validate=False)
    assert zoo._sha256(source) == before
    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    assert convs, "Constant-node weights must be found"
    for conv in convs:  # every weight (a Constant node in the shipped file) became int8 + DequantizeLinear
        dq = conv.inputs[1].producer()
        assert dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value.dtype.name == "INT8"
    evaluation = ppocr.make_inputs(name, n_eval, seed=1)
    labels = evaluation.pop("label", None)
    x = next(iter(evaluation.values()))
    reference, quantized = _outputs(source, x), _outputs(result.output, x)
    assert quantized.shape == reference.shape
    sqnr = qmath.sqnr_db(reference, quantized)
    if name == "ppocr_cls":
        assert sqnr > 22 and ppocr.cls_accuracy(quantized, labels) >= ppocr.cls_accuracy(reference, labels) - 0.04
    elif name == "ppocr_rec":
        assert sqnr > 9 and ppocr.rec_string_agreement(reference, quantized) >= 0.2
    else:
        f1 = np.mean([ppocr.det_box_f1(r[0], q[0]) for r, q in zip(reference, quantized, strict=True)])
        assert sqnr > 10 and f1 > 0.9
