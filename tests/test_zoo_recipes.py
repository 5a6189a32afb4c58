"""Every zoo model through every built-in recipe with the real CLI and no hand fixes: exit 0, the output
loads and runs in onnxruntime with finite outputs of the float model's shapes, and the working directory
holds nothing but what was asked for. Few calibration samples: this is about surviving, not accuracy
(the accuracy tests are in test_zoo.py and the benches)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from onnxq.recipe import builtin_names

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import ppocr, tinygpt, zoo  # noqa: E402

pytestmark = pytest.mark.slow

MODELS = ["digits", "tinygpt", "ppocr_cls", "ppocr_rec", "ppocr_det"]
# quick settings for the measuring recipes (the search is exercised, not tuned)
FAST = {
    "mixed": [
        "passes.mixed_precision.objective=bitops",
        "passes.mixed_precision.samples=2",
        "passes.mixed_precision.target_samples=4",
    ],
    "int8-tuned": ["passes.search_ranges.samples=2"],
}


def _model_and_data(name: str, folder: Path) -> tuple[Path, Path]:
    if name == "digits":
        return REPO / "models/digits/digits_cnn.onnx", REPO / "models/digits/calib.npz"
    if name == "tinygpt":
        data = folder / "gpt.npz"
        np.savez(data, **{tinygpt.INPUT_NAME: tinygpt.make_windows(tinygpt.calib_text(), seq_len=32, n=4)})
        return tinygpt.MODEL_PATH, data
    return zoo.fetch(name), ppocr.make_npz(name, 4, folder / f"{name}.npz", seed=0)


@pytest.mark.parametrize("recipe", builtin_names())
@pytest.mark.parametrize("model_name", MODELS)
def test_every_zoo_model_survives_every_builtin_recipe(tmp_path: Path, model_name: str, recipe: str) -> None:
    data_dir, work = tmp_path / "data", tmp_path / "cwd"
    data_dir.mkdir()
    work.mkdir()
    source, data = _model_and_data(model_name, data_dir)
    before = source.read_bytes()
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    sets = [arg for s in ["calibration.num_samples=4", *FAST.get(recipe, [])] for arg in ("--set", s)]
    command = [sys.executable, "-m", "onnxq", "run", str(source), "-r", recipe, "--calib", str(data), "-o", str(out)]
    done = subprocess.run(
        [*command, *sets, "--no-validate", "--quiet"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert source.read_bytes() == before
    assert list(work.iterdir()) == []
    assert {p.name for p in out.parent.iterdir()} <= {
        "q.onnx",
        "q.onnx.calib.json",
        "q.onnx.report.json",
        "q.onnx.report.html",
    }
    feeds = dict(np.load(data))
    float_session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    sample = {k: v[:1] for k, v in feeds.items() if k in names}
    expected = float_session.run(None, sample)
    got = session.run(None, sample)
    for ref, test in zip(expected, got, strict=True):
        assert test.shape == ref.shape
        assert np.all(np.isfinite(test))
