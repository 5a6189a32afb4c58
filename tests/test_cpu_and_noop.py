"""`reduce_range: auto` follows the CPU's int8 kernels; a recipe that quantizes nothing says so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import cnn_data

import onnxq
from onnxq import cpu
from onnxq.qspec import QuantSpec


@pytest.mark.parametrize(
    ("machine", "flags", "saturates"),
    [
        ("x86_64", {"avx2", "fma"}, True),  # AVX2: u8·s8 pairs summed in int16
        ("x86_64", {"avx2", "avx512bw"}, True),
        ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}, False),
        ("x86_64", {"avx2", "avx_vnni"}, False),
        ("x86_64", set(), True),  # flags unreadable: 7-bit is the safe choice
        ("aarch64", set(), False),
    ],
)
def test_reduce_range_auto_follows_the_int8_kernels(
    monkeypatch: pytest.MonkeyPatch, machine: str, flags: set[str], saturates: bool
) -> None:
    cpu.int8_pairs_saturate.cache_clear()
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
    monkeypatch.setattr(cpu, "x86_flags", lambda: frozenset(flags))
    try:
        assert cpu.int8_pairs_saturate() is saturates
        assert QuantSpec(dtype="int8", reduce_range="auto").reduce_range is saturates  # type: ignore[arg-type]
    finally:
        cpu.int8_pairs_saturate.cache_clear()


def test_a_recipe_that_quantizes_nothing_says_so_and_suggests_one_that_does(tmp_path: Path) -> None:
    helper = onnx.helper
    weight = np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "conv_only",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 8, 8])],
        [onnx.numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=cnn_data(8))
    result = onnxq.run(tmp_path / "m.onnx", "w8-block", output=tmp_path / "w8.onnx", validate=False)
    assert result.notes[0].startswith("nothing was quantized by recipe 'w8-block' (this model has Conv×1)")
    assert "try --recipe int8" in result.notes[0]
    int8 = onnxq.run(tmp_path / "m.onnx", "int8", calib=str(tmp_path / "calib.npz"), output=tmp_path / "q.onnx")
    assert not any(n.startswith("nothing was quantized") for n in int8.notes)
    # in a float16 model, the Casts that keep its interface are not quantization
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(tmp_path / "m.onnx"))), tmp_path / "half.onnx")
    half = onnxq.run(tmp_path / "half.onnx", "w8-block", output=tmp_path / "h.onnx", validate=False)
    assert any(n.startswith("nothing was quantized") for n in half.notes), half.notes
