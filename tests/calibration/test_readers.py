"""Data readers: each kind of bad data is a one-line error naming the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import small_cnn

from onnxq import ir as onnxq_ir
from onnxq.calibration.readers import NpzReader, input_specs, open_data
from onnxq.errors import UsageError

SPECS = input_specs(onnxq_ir.from_proto(small_cnn()))


def _npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((2, 1, 8, 8), np.float32)}, "no array for model input 'x'"),
        ({"x": np.zeros((2, 8, 8), np.float32)[None, None]}, "rank 5 .*the model expects rank 4"),
        ({"x": np.zeros((2, 3, 8, 8), np.float32)}, "size 3 on axis 1, the model expects 1"),
        ({"x": np.full((2, 1, 8, 8), np.nan, np.float32)}, "128 NaN/Inf values"),
        ({"x": np.array([["a"] * 8] * 8)[None, None]}, "the model expects float32"),
        ({"x": np.zeros((0, 1, 8, 8), np.float32)}, "zero samples"),
    ],
)
def test_bad_data_is_reported_in_one_line(tmp_path: Path, arrays: dict, message: str) -> None:
    reader = open_data(_npz(tmp_path, **arrays), SPECS, 16)
    with pytest.raises(UsageError, match=message) as info:
        list(reader())
    assert "\n" not in str(info.value)


def test_folder_of_npz_files_is_read_in_order_up_to_num_samples(tmp_path: Path) -> None:
    for i in range(3):
        np.savez(tmp_path / f"{i}.npz", x=np.full((4, 1, 8, 8), i, np.float32))
    chunks = list(NpzReader(tmp_path, SPECS, num_samples=10))
    assert [c["x"].shape[0] for c in chunks] == [4, 4, 2]
    assert [float(c["x"][0, 0, 0, 0]) for c in chunks] == [0.0, 1.0, 2.0]


def test_float64_and_unbatched_samples_are_conformed(tmp_path: Path) -> None:
    (chunk,) = list(NpzReader(_npz(tmp_path, x=np.ones((1, 8, 8))), SPECS))
    assert chunk["x"].dtype == np.float32 and chunk["x"].shape == (1, 1, 8, 8)


def test_labels_pass_through_as_extras(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.ones((3, 1, 8, 8), np.float32), label=np.arange(3))
    (chunk,) = list(NpzReader(path, SPECS, extras=("label",)))
    assert list(chunk["label"]) == [0, 1, 2]


@pytest.mark.parametrize(("source", "message"), [("missing.npz", "does not exist"), ("empty_dir", "no .npz files")])
def test_bad_paths(tmp_path: Path, source: str, message: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UsageError, match=message):
        open_data(tmp_path / source, SPECS)


def test_synthetic_reader_fills_symbolic_dims() -> None:
    chunks = list(open_data("synthetic", SPECS, 3)())
    assert len(chunks) == 3 and chunks[0]["x"].shape == (1, 1, 8, 8)
