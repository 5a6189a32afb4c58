"""Every data layout people save is one or more feeds that run as they are: batched on each input's batch
axis (an RNN state's is 1), one feed whose inputs share no batch size, feeds stacked on a new axis 0, a folder
of one-feed files, and a function yielding exactly the feeds the model takes. Each route calibrates, quantizes
and validates the model on the samples it holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import fixed_batch_if, stacked_lstm

import onnxq
from onnxq.calibration.readers import input_specs, open_data, rebatch, sample_count
from onnxq.errors import UsageError

LAYERS, FEATURES, HIDDEN, TIME = 3, 8, 16, 6


def lstm_feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.standard_normal((1, TIME, FEATURES)).astype(np.float32),
            "h0": (0.5 * rng.standard_normal((LAYERS, 1, HIDDEN))).astype(np.float32),
            "c0": (0.5 * rng.standard_normal((LAYERS, 1, HIDDEN))).astype(np.float32),
        }
        for _ in range(count)
    ]


def if_feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"cond": np.array([i % 2 == 0]), "input_0": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}
        for i in range(count)
    ]


def quantize(tmp_path: Path, model: onnx.ModelProto, calib: str) -> onnxq.runner.Result:
    source = tmp_path / "model.onnx"
    onnx.save(model, source)
    return onnxq.run(source, "int8", calib=calib, output=tmp_path / "q.onnx")


def folder_of(tmp_path: Path, feeds: list[dict[str, np.ndarray]]) -> str:
    folder = tmp_path / "feeds"
    folder.mkdir()
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index:03d}.npz", **feed)
    return str(folder)


def stacked(tmp_path: Path, feeds: list[dict[str, np.ndarray]]) -> str:
    path = tmp_path / "stacked.npz"
    np.savez(path, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    return str(path)


def function_file(tmp_path: Path, builder: str, count: int) -> str:
    script = tmp_path / "feeds.py"
    here = Path(__file__).resolve().parent
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(here)!r})\nfrom test_layouts import {builder}\n\n"
        f"def feeds():\n    yield from {builder}({count})\n"
    )
    return f"{script}:feeds"


@pytest.mark.parametrize("named", [True, False], ids=["named-dims", "unnamed-dims"])
@pytest.mark.parametrize("route", ["folder", "stacked", "function", "batched"])
def test_an_lstm_with_layer_major_states_calibrates_from_every_layout(tmp_path: Path, route: str, named: bool) -> None:
    feeds = lstm_feeds(12)
    if route == "folder":
        calib = folder_of(tmp_path, feeds)
    elif route == "stacked":
        calib = stacked(tmp_path, feeds)
    elif route == "function":
        calib = function_file(tmp_path, "lstm_feeds", 12)
    else:  # samples on each input's batch axis: x on 0, the states on 1
        calib = str(tmp_path / "batched.npz")
        np.savez(
            calib,
            x=np.concatenate([f["x"] for f in feeds]),
            h0=np.concatenate([f["h0"] for f in feeds], axis=1),
            c0=np.concatenate([f["c0"] for f in feeds], axis=1),
        )
    result = quantize(tmp_path, stacked_lstm(LAYERS, FEATURES, HIDDEN, named=named), calib)
    (validation,) = result.validation
    assert validation.samples == 12
    quality = {o.name: o.sqnr_db for o in validation.outputs}
    assert quality["y"] > 25, quality  # the head MatMul is int8; the LSTMs stay float under static int8
    assert quality["hn"] > 60, quality
    ops = [n.op_type for n in onnx.load(str(result.output)).graph.node]
    assert ops.count("DequantizeLinear") >= 2


@pytest.mark.parametrize("route", ["one-feed", "folder", "stacked", "function"])
def test_inputs_with_different_fixed_batch_sizes_calibrate(tmp_path: Path, route: str) -> None:
    feeds = if_feeds(6)
    if route == "one-feed":
        calib = str(tmp_path / "one.npz")
        np.savez(calib, **feeds[0])
    elif route == "folder":
        calib = folder_of(tmp_path, feeds)
    elif route == "stacked":
        calib = stacked(tmp_path, feeds)
    else:
        calib = function_file(tmp_path, "if_feeds", 6)
    result = quantize(tmp_path, fixed_batch_if(), calib)
    (validation,) = result.validation
    assert validation.samples == (1 if route == "one-feed" else 6)
    assert validation.outputs[0].sqnr_db > 25
    optimized = onnx.load(str(result.output))
    assert sum(n.op_type == "DequantizeLinear" for n in optimized.graph.node) >= 2


def test_rebatch_splits_each_input_on_its_own_batch_axis() -> None:
    import onnx_ir as ir

    specs = input_specs(ir.from_proto(stacked_lstm(LAYERS, FEATURES, HIDDEN)))
    assert [s.batch_axis for s in specs] == [0, 1, 1]
    batch = {
        "x": np.zeros((5, TIME, FEATURES), np.float32),
        "h0": np.zeros((LAYERS, 5, HIDDEN), np.float32),
        "c0": np.zeros((LAYERS, 5, HIDDEN), np.float32),
    }
    chunks = list(rebatch([batch], specs, 2))
    assert [sample_count(c, specs) for c in chunks] == [2, 2, 1]
    assert chunks[-1]["h0"].shape == (LAYERS, 1, HIDDEN)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {
                "x": np.zeros((1, 1, 1, TIME, FEATURES)),
                "h0": np.zeros((LAYERS, 1, HIDDEN)),
                "c0": np.zeros((LAYERS, 1, HIDDEN)),
            },
            "'x' .* has rank 5 .*the model expects rank 3",
        ),
        (
            {
                "x": np.zeros((1, TIME, FEATURES)),
                "h0": np.zeros((1, 1, 1, HIDDEN)),
                "c0": np.zeros((LAYERS, 1, HIDDEN)),
            },
            "'h0' .* has rank 4 .*the model expects rank 3",
        ),
        (
            {
                "x": np.zeros((2, 1, TIME, FEATURES)),
                "h0": np.zeros((3, LAYERS, 1, HIDDEN)),
                "c0": np.zeros((3, LAYERS, 1, HIDDEN)),
            },
            "stacks different numbers of samples",
        ),
    ],
)
def test_wrong_layouts_name_the_rank(tmp_path: Path, arrays: dict, message: str) -> None:
    import onnx_ir as ir

    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})
    specs = input_specs(ir.from_proto(stacked_lstm(LAYERS, FEATURES, HIDDEN)))
    with pytest.raises(UsageError, match=message):
        list(open_data(str(path), specs)())
