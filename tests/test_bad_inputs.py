"""Every kind of bad input a user meets, through the real CLI: exit code 2, one line naming the problem
(and the fix), no traceback, and no output file written. Ctrl-C leaves no partial output either."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import cnn_data, small_cnn

Setup = Callable[[Path], list[str]]  # builds the case in a folder, returns the CLI arguments


def _model(folder: Path) -> Path:
    path = folder / "m.onnx"
    onnx.save(small_cnn(), path)
    return path


def _calib(folder: Path, **arrays: np.ndarray) -> Path:
    path = folder / "calib.npz"
    np.savez(path, **(arrays or {"x": cnn_data(8)}))
    return path


def _run(folder: Path, *extra: str | Path, model: Path | None = None) -> list[str]:
    return ["run", str(model or _model(folder)), "-o", str(folder / "out.onnx"), *map(str, extra)]


def _not_a_file(folder: Path) -> list[str]:
    (folder / "dir.onnx").mkdir()
    return _run(folder, model=folder / "dir.onnx")


def _not_onnx(folder: Path) -> list[str]:
    (folder / "text.onnx").write_text("this is not a model\n")
    return _run(folder, model=folder / "text.onnx")


def _truncated(folder: Path) -> list[str]:
    data = _model(folder).read_bytes()
    (folder / "cut.onnx").write_bytes(data[: len(data) // 2])
    return _run(folder, model=folder / "cut.onnx")


def _checker_fails(folder: Path) -> list[str]:
    model = small_cnn()
    model.graph.node[0].input[0] = "no_such_tensor"  # a node reading a value nothing produces
    onnx.save(model, folder / "broken.onnx")
    return _run(folder, "--calib", _calib(folder), model=folder / "broken.onnx")


def _missing_input(folder: Path) -> list[str]:
    return _run(folder, "--calib", _calib(folder, y=cnn_data(8)))


def _wrong_dtype(folder: Path) -> list[str]:
    return _run(folder, "--calib", _calib(folder, x=cnn_data(8).astype(np.int32)))


def _wrong_rank(folder: Path) -> list[str]:
    return _run(folder, "--calib", _calib(folder, x=cnn_data(8).reshape(8, 64)))


def _nan(folder: Path) -> list[str]:
    x = cnn_data(8)
    x[3, 0, 2, 2] = np.nan
    return _run(folder, "--calib", _calib(folder, x=x))


def _zero_samples(folder: Path) -> list[str]:
    return _run(folder, "--calib", _calib(folder, x=cnn_data(8)[:0]))


def _recipe(text: str) -> Setup:
    def setup(folder: Path) -> list[str]:
        (folder / "r.yaml").write_text(text)
        return _run(folder, "--recipe", folder / "r.yaml", "--calib", _calib(folder))

    return setup


def _same_output(folder: Path) -> list[str]:
    model = _model(folder)
    return ["run", str(model), "-o", str(model), "--calib", str(_calib(folder))]


def _unwritable_folder(folder: Path) -> list[str]:
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return ["run", str(_model(folder)), "-o", str(locked / "out.onnx"), "--calib", str(_calib(folder))]


def _missing_custom_op_library(folder: Path) -> list[str]:
    return _run(folder, "--calib", _calib(folder), "--custom-ops", folder / "libmissing.so")


def _per_channel_activations(folder: Path) -> list[str]:
    return _run(folder, "--calib", _calib(folder), "--set", "defaults.activations.granularity=channel")


def _map_output(folder: Path) -> list[str]:
    """scikit-learn's default export: class probabilities as a sequence of maps (ZipMap)."""
    helper = onnx.helper
    map_type = helper.make_map_type_proto(
        onnx.TensorProto.INT64, helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, [])
    )
    output = helper.make_value_info("z", helper.make_sequence_type_proto(map_type))
    graph = helper.make_graph(
        [helper.make_node("ZipMap", ["x"], ["z"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])],
        "zipmap",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3])],
        [output],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("ai.onnx.ml", 3)], ir_version=7
    )
    onnx.save(model, folder / "zipmap.onnx")
    return _run(folder, model=folder / "zipmap.onnx")


def _output_is_a_folder(folder: Path) -> list[str]:
    (folder / "out").mkdir()
    return ["run", str(_model(folder)), "-o", str(folder / "out"), "--calib", str(_calib(folder))]


def _output_under_a_file(folder: Path) -> list[str]:
    (folder / "plain.txt").write_text("a file, not a folder\n")
    return ["run", str(_model(folder)), "-o", str(folder / "plain.txt" / "out.onnx"), "--calib", str(_calib(folder))]


def _unloadable(folder: Path) -> list[str]:
    """A Conv on a 2-D input: onnx.checker passes it, onnxruntime refuses to load it."""
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="the_conv")],
        "conv2d_on_matrix",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 6])],
        initializer=[onnx.numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    onnx.save(model, folder / "bad.onnx")
    return _run(folder, "--calib", _calib(folder, x=np.ones((4, 8), np.float32)), model=folder / "bad.onnx")


def _data(**arrays: np.ndarray) -> Setup:
    def setup(folder: Path) -> list[str]:
        data = folder / "eval.npz"
        np.savez(data, **arrays)
        return _run(folder, "--calib", _calib(folder), "--data", data)

    return setup


def _data_missing(folder: Path) -> list[str]:
    return _run(folder, "--calib", _calib(folder), "--data", folder / "no_such_eval.npz")


_NAN_X = cnn_data(8)
_NAN_X[1, 0, 0, 0] = np.nan

CASES: dict[str, tuple[Setup, str]] = {
    "output is a folder": (_output_is_a_folder, "is a folder"),
    "output under a file": (_output_under_a_file, "which is a file"),
    "onnxruntime cannot load the float model": (_unloadable, "onnxruntime cannot load the float model"),
    "evaluation data: missing file": (_data_missing, "evaluation data"),
    "evaluation data: wrong names": (_data(y=cnn_data(8)), "no array for model input 'x'"),
    "evaluation data: wrong shapes": (_data(x=cnn_data(8).reshape(8, 1, 4, 16)), "size 4 on axis 2"),
    "evaluation data: NaN": (_data(x=_NAN_X), "NaN"),
    "not a file": (_not_a_file, "is not a file"),
    "not ONNX": (_not_onnx, "not a readable ONNX model"),
    "map-typed output (ZipMap)": (_map_output, "zipmap': false"),
    "truncated file": (_truncated, "not a readable ONNX model"),
    "fails onnx.checker": (_checker_fails, "no_such_tensor"),
    "calibration: missing input name": (_missing_input, "'x'"),
    "calibration: wrong dtype": (_wrong_dtype, "int32"),
    "calibration: wrong rank": (_wrong_rank, "rank"),
    "calibration: NaN": (_nan, "NaN"),
    "calibration: zero samples": (_zero_samples, "zero samples"),
    "recipe: unknown key": (_recipe("calibrashun: {}\n"), "did you mean 'calibration'"),
    "recipe: wrong type": (_recipe("calibration: {num_samples: many}\n"), "calibration.num_samples"),
    "recipe: unknown pass": (_recipe("passes:\n  - insert_qdqq: {}\n"), "did you mean 'insert_qdq'"),
    "recipe: impossible order": (_recipe("passes:\n  - insert_qdq: {}\n  - assign_precision: {}\n"), "after"),
    "output equal to input": (_same_output, "is the input model"),
    "output folder not writable": (_unwritable_folder, "not writable"),
    "recipe: per-channel activations": (_per_channel_activations, "activations granularity channel"),
    "custom-op library missing": (_missing_custom_op_library, "libmissing.so' does not exist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    if case == "output folder not writable" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    setup, expected = CASES[case]
    args = setup(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = subprocess.run(
        [sys.executable, "-m", "onnxq", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert expected.lower() in message.lower(), message
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, not even a temp file


def test_ctrl_c_leaves_no_partial_output(tmp_path: Path) -> None:
    """SIGINT arrives while calibration runs (the data source sends it after a few samples)."""
    feeds = tmp_path / "feeds.py"
    feeds.write_text(
        "import os, signal\nimport numpy as np\n\n"
        "def feeds():\n"
        "    for i in range(64):\n"
        "        if i == 4:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        yield {'x': np.random.default_rng(i).standard_normal((1, 1, 8, 8)).astype(np.float32)}\n"
    )
    model = _model(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*") if "__pycache__" not in str(p))
    result = subprocess.run(
        [sys.executable, "-m", "onnxq", "run", str(model), "--calib", f"{feeds}:feeds", "-o", str(tmp_path / "o.onnx")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 130, (result.returncode, result.stderr[-2000:])
    assert "interrupted" in result.stderr.lower() and "Traceback" not in result.stderr
    after = sorted(p.name for p in tmp_path.rglob("*") if "__pycache__" not in str(p))
    assert after == before
