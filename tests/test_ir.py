"""Model I/O: IR version fix-up, atomic writes, refusal to overwrite the input, clear load errors."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from builders import small_cnn

from onnxq import ir as onnxq_ir
from onnxq.errors import UsageError


def test_save_writes_the_ir_version_onnxruntime_accepts(tmp_path: Path) -> None:
    proto = small_cnn(opset=17)
    proto.ir_version = 14  # what onnx 1.23 stamps by default
    model = onnxq_ir.from_proto(proto)
    out = onnxq_ir.save(model, tmp_path / "m.onnx")
    assert onnx.load(out).ir_version == 8
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp file left


def test_save_refuses_to_overwrite_the_input(cnn_path: Path) -> None:
    before = cnn_path.read_bytes()
    with pytest.raises(UsageError, match="is the input model"):
        onnxq_ir.save(onnxq_ir.load(cnn_path), cnn_path, source=cnn_path)
    assert cnn_path.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), (b"not a model at all", "not a readable ONNX model")],
)
def test_load_errors_are_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as info:
        onnxq_ir.load(path)
    assert "\n" not in str(info.value)


def test_truncated_model_is_refused(tmp_path: Path, cnn_path: Path) -> None:
    path = tmp_path / "cut.onnx"
    path.write_bytes(cnn_path.read_bytes()[:500])
    with pytest.raises(UsageError, match="not a readable ONNX model"):
        onnxq_ir.load(path)
