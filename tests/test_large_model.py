"""Models with external data: quantized without loading or keeping their weights, written with external data.

The >2 GB case itself is `bench/large_model.py` (peak RSS / model size); here a ~30 MB instance of the same
generated decoder goes through the same code paths, and `save` is forced onto its external-data path.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnxq  # noqa: E402
from models import make_large  # noqa: E402
from onnxq import blockquant, packing  # noqa: E402
from onnxq import ir as onnxq_ir  # noqa: E402
from onnxq.errors import UsageError  # noqa: E402
from onnxq.passes.matmul_nbits import _pack_columns  # noqa: E402
from onnxq.qmath import sqnr_db  # noqa: E402

SHAPE = make_large.Dims(hidden=256, layers=4, vocab=8192, heads=4)  # 29 MB of float32 weights
RTN = ["passes.quantize_weights.algorithm=rtn"]


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_large.write_model(tmp_path_factory.mktemp("input") / "decoder.onnx", SHAPE)


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {make_large.INPUT_NAME: ids})[0]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


def test_generated_model_keeps_its_weights_in_one_data_file(large: Path) -> None:
    assert sorted(p.name for p in large.parent.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    assert large.stat().st_size < 100_000  # the graph; the weights are all in the data file
    assert make_large.model_bytes(large) >= SHAPE.total_bytes() - 64_000  # LayerNorm parameters stay inline
    onnx.checker.check_model(str(large), full_check=True)


def test_rtn_int4_of_an_external_data_model_streams_and_writes_external_data(large: Path, tmp_path: Path) -> None:
    before = _digests(large.parent)
    model = onnxq_ir.load(large)
    weights = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert weights and all(t.raw is None for t in weights)  # loading maps nothing
    out = tmp_path / "decoder.q.onnx"
    result = onnxq.run(model, "int4-weight", output=out, overrides=RTN, validate=False)

    assert _digests(large.parent) == before  # the input files are never written
    assert all(t.raw is None for t in weights)  # every float weight unmapped once quantized (or never read)
    # nothing refers to the input's data file: the embedding is int4 now (GatherBlockQuantized), so what is
    # left may be small enough to sit inside the model file
    assert _locations(out) <= {"decoder.q.onnx.data"}
    assert "decoder.q.onnx" in {p.name for p in tmp_path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert sum(n.op_type == "MatMulNBits" for n in result.model.graph) == 6 * SHAPE.layers + 1

    ids = np.random.default_rng(0).integers(0, SHAPE.vocab, (2, 16)).astype(np.int64)
    # measured 15.4 dB (int4 blocks of 32 on random weights, int8 activations inside MatMulNBits)
    assert sqnr_db(_logits(large, ids), _logits(out, ids)) > 14.0


def test_localization_of_an_external_data_model_reads_the_weights_where_they_are(large: Path, tmp_path: Path) -> None:
    """The float graph kept before lowering refers to the input's .data file; its session is told where that is."""
    ids = np.random.default_rng(1).integers(0, SHAPE.vocab, (4, 16)).astype(np.int64)
    np.savez(tmp_path / "ids.npz", **{make_large.INPUT_NAME: ids})
    out = tmp_path / "decoder.q.onnx"
    sets = ["validate.localize=always", "validate.whatif_top=2"]
    for recipe in ("w8-block", "int8"):  # MatMulNBits (renamed nodes), then Q/DQ (what-if can keep two in float)
        result = onnxq.run(large, recipe, calib=str(tmp_path / "ids.npz"), output=out, overrides=sets)
        located = result.localization
        assert located is not None and located["samples"] == 4
        ranked = [n for n in located["nodes"] if n["quantized"] and n["op_type"] == "MatMul"]
        assert len(ranked) >= 6 * SHAPE.layers, recipe  # every quantized MatMul was matched and measured
    assert located["whatif"] is not None and len(located["whatif"]["kept_float"]) == 2


@pytest.fixture(scope="module")
def small_external(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_large.write_model(tmp_path_factory.mktemp("small") / "decoder.onnx", SMALL)


SMALL = make_large.Dims(hidden=128, layers=2, vocab=2048, heads=4)  # 4 MB, weights in decoder.onnx.data


@pytest.mark.parametrize("recipe", ["int8", "int8-transformer", "int4-weight", "mixed"])
def test_recipes_that_calibrate_read_external_weights_where_they_are(
    small_external: Path, tmp_path: Path, recipe: str
) -> None:
    """Calibration, Hessians (GPTQ) and sensitivity variants all run sessions on serialized bytes whose
    weights stay in the input's .data file; none may lose track of it, nor write next to the input."""
    before = _digests(small_external.parent)
    ids = np.random.default_rng(2).integers(0, SMALL.vocab, (8, 16)).astype(np.int64)
    np.savez(tmp_path / "ids.npz", **{make_large.INPUT_NAME: ids})
    out = tmp_path / f"{recipe}.onnx"
    onnxq.run(small_external, recipe, calib=str(tmp_path / "ids.npz"), output=out, validate=False)
    assert _digests(small_external.parent) == before
    assert sqnr_db(_logits(small_external, ids[:2]), _logits(out, ids[:2])) > 10.0


def test_fingerprint_does_not_read_external_weights(large: Path) -> None:
    model = onnxq_ir.load(large)
    first = onnxq_ir.model_fingerprint(model)
    assert all(
        v.const_value.raw is None
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    )
    assert onnxq_ir.model_fingerprint(onnxq_ir.load(large)) == first
    model.graph.node(0).name = "renamed"
    assert onnxq_ir.model_fingerprint(model) != first


def test_save_past_the_size_limit_writes_external_data_that_onnxruntime_loads(
    large: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = ir.external_data.load_to_model(onnxq_ir.load(large))  # every weight in memory: no input files
    monkeypatch.setattr(onnxq_ir, "TWO_GB", 1 << 20)
    out = onnxq_ir.save(model, tmp_path / "copy.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "copy.onnx.data"]  # no temp files left
    assert out.stat().st_size < 100_000
    ids = np.arange(8, dtype=np.int64)[None]
    np.testing.assert_array_equal(_logits(out, ids), _logits(large, ids))


def test_save_in_shards(large: Path, tmp_path: Path) -> None:
    out = onnxq_ir.save(onnxq_ir.load(large), tmp_path / "sharded.onnx", max_shard_bytes=8 << 20)
    shards = sorted(p.name for p in tmp_path.iterdir() if p.name != "sharded.onnx")
    assert len(shards) >= 3 and shards[0] == f"sharded-00001-of-{len(shards):05d}.onnx.data"
    assert _locations(out) == set(shards)
    ids = np.arange(8, dtype=np.int64)[None]
    np.testing.assert_array_equal(_logits(out, ids), _logits(large, ids))


def test_a_recipe_can_shard_its_output_and_sizes_count_the_data_files(small_external: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    sets = ["output.max_shard_bytes=1000000", *RTN]
    result = onnxq.run(small_external, "w8-block", output=out, overrides=sets, validate=False)
    shards = sorted(p for p in tmp_path.iterdir() if p.name.startswith("q-") and p.name.endswith(".onnx.data"))
    assert len(shards) >= 2 and _locations(out) == {p.name for p in shards}
    assert result.sizes["output_bytes"] == out.stat().st_size + sum(p.stat().st_size for p in shards)
    data = small_external.with_name(small_external.name + ".data")
    assert result.sizes["input_bytes"] == small_external.stat().st_size + data.stat().st_size
    ids = np.arange(8, dtype=np.int64)[None]
    assert sqnr_db(_logits(small_external, ids), _logits(out, ids)) > 25


def test_a_missing_data_file_is_a_usage_error(large: Path, tmp_path: Path) -> None:
    alone = tmp_path / large.name
    alone.write_bytes(large.read_bytes())  # the .onnx without its .data
    with pytest.raises(UsageError, match="external data file that is missing"):
        onnxq_ir.load(alone)


@pytest.mark.parametrize(("dtype", "symmetric"), [("uint4", False), ("int4", True), ("int8", True)])
def test_weights_are_quantized_and_packed_in_slices_bit_exactly(dtype: str, symmetric: bool) -> None:
    w = np.random.default_rng(3).standard_normal((200, 96)).astype(np.float32)  # a short last block
    whole = blockquant.rtn(w, 32, dtype, symmetric, chunk_values=1 << 30)
    sliced = blockquant.rtn(w, 32, dtype, symmetric, chunk_values=5000)  # 32 rows a slice
    np.testing.assert_array_equal(sliced.q, whole.q)
    np.testing.assert_array_equal(sliced.scale, whole.scale)
    assert (sliced.zero is None) == (whole.zero is None)
    bits, offset = (8, 128) if dtype == "int8" else (4, 8 if symmetric else 0)  # signed codes + 2^(bits-1)
    packed = _pack_columns(whole.q, offset, bits, 32, chunk_values=2000)  # 10 columns a slice
    codes = (whole.q.astype(np.int16) + offset).astype(np.uint8)
    np.testing.assert_array_equal(packed, packing.pack_weight(codes, bits, 32))


@pytest.mark.parametrize("from_its_folder", [True, False])
def test_an_old_opset_external_data_model_quantizes_right_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, from_its_folder: bool
) -> None:
    """Two Conv weights of one shape in one data file, opset 11: the version converter and onnxsim see the
    weights themselves (onnxsim used to merge the two by their file reference; the converted model used to
    look for the data file in the current folder)."""
    sys.path.insert(0, str(REPO / "tests"))
    from builders import cnn_data

    rng = np.random.default_rng(0)
    helper = onnx.helper
    w1, w2 = (rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2 for _ in range(2))
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Conv", ["b", "w1"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["d"]),
            helper.make_node("Conv", ["d", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        "two_alike",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8, 8, 8])],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w0"),
            onnx.numpy_helper.from_array(w1, "w1"),
            onnx.numpy_helper.from_array(w2, "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    x = cnn_data(16)
    np.savez(tmp_path / "calib.npz", x=x)
    monkeypatch.chdir(folder if from_its_folder else tmp_path)
    result = onnxq.run(folder / "m.onnx", "int8", calib=str(tmp_path / "calib.npz"), output=tmp_path / "q.onnx")
    (reference,) = ort.InferenceSession(str(folder / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    quantized = _logits_of(result.output, x)
    assert sqnr_db(reference, quantized) > 25
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.onnx.data"]


def _logits_of(path: Path | str, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
