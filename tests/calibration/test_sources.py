"""Image folders with a declared preprocessing, and Python callables, as calibration data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from builders import small_cnn

import onnxq
from onnxq import ir as onnxq_ir
from onnxq.calibration.readers import input_specs, open_data
from onnxq.calibration.sources import Preprocess
from onnxq.errors import UsageError

SPECS = input_specs(onnxq_ir.from_proto(small_cnn()))


def _images(folder: Path, count: int = 5) -> Path:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_image_folder_is_preprocessed_as_declared(tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs")
    preprocess = Preprocess(size=(8, 8), channels="L", scale=1 / 255, mean=[0.5], std=[0.25])
    batches = list(open_data(folder, SPECS, 3, preprocess=preprocess)())
    assert len(batches) == 3
    x = batches[0]["x"]
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6


def test_recipe_with_image_folder_runs_end_to_end(cnn_path: Path, tmp_path: Path) -> None:
    folder = _images(tmp_path / "imgs")
    result = onnxq.run(
        cnn_path,
        {
            "calibration": {"preprocess": {"size": [8, 8], "channels": "L"}},
            "passes": [{"assign_precision": {}}, {"insert_qdq": {}}],
        },
        calib=str(folder),
        output=tmp_path / "q.onnx",
        validate=False,
    )
    assert result.calibration_seconds > 0


def test_python_callable_yields_feeds(cnn_path: Path, tmp_path: Path) -> None:
    source = tmp_path / "mydata.py"
    source.write_text(
        "import numpy as np\n"
        "def feeds(specs):\n"
        "    rng = np.random.default_rng(0)\n"
        "    for _ in range(6):\n"
        "        yield {specs[0].name: rng.uniform(0, 1, (1, 1, 8, 8)).astype('float32')}\n"
    )
    batches = list(open_data(f"{source}:feeds", SPECS, 4)())
    assert len(batches) == 4
    result = onnxq.run(cnn_path, "int8", calib=f"{source}:feeds", output=tmp_path / "q.onnx", validate=False)
    assert result.calibration_seconds > 0


@pytest.mark.parametrize(
    ("reference", "message"),
    [("no_such_module_xyz:feeds", "cannot import"), ("json:no_such_function", "has no function")],
)
def test_bad_callables_are_one_line_errors(reference: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        open_data(reference, SPECS)
    assert "\n" not in str(info.value)


def test_folder_without_images_or_npz(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images"):
        open_data(tmp_path / "empty", SPECS, preprocess=Preprocess(size=(8, 8)))
    with pytest.raises(UsageError, match=r"calibration\.preprocess"):
        open_data(tmp_path / "empty", SPECS)


def test_a_data_module_in_the_current_folder_is_found_as_python_m_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console script's sys.path lacks the current folder; `--calib mydata:feeds` must still work."""
    import sys

    from onnxq.calibration.sources import load_callable

    (tmp_path / "onnxq_test_feeds_here.py").write_text("def feeds():\n    return [{'x': 1}]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_callable("onnxq_test_feeds_here:feeds")() == [{"x": 1}]
