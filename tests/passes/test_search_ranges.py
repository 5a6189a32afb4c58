"""Per-tensor range search: never worse than the best single method on its samples, and lowered as chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from conftest import DIGITS
from onnx import numpy_helper
from ort_util import run

import onnxq
from onnxq import qmath
from onnxq.passes.search_ranges import slice_energies
from onnxq.recipe import read_recipe_source


def _recipe(method: str, search: bool) -> dict:
    recipe = read_recipe_source("int8")
    recipe["calibration"]["method"] = method
    if search:
        at = next(i for i, p in enumerate(recipe["passes"]) if "insert_qdq" in p)
        recipe["passes"].insert(at, {"search_ranges": {"samples": 8}})
    return recipe


def _sqnr(out: Path) -> float:
    data = np.load(DIGITS / "eval.npz")
    x = data[data.files[0]]
    (ref,) = run(DIGITS / "digits_cnn.onnx", {"input": x})
    (got,) = run(out, {"input": x})
    return qmath.sqnr_db(ref, got)


def test_search_beats_every_single_method_on_its_samples_and_lowers_its_choice(tmp_path: Path) -> None:
    out = tmp_path / "searched.onnx"
    result = onnxq.run(
        DIGITS / "digits_cnn.onnx", _recipe("minmax", True), calib=str(DIGITS / "calib.npz"), output=out, validate=False
    )
    found = result.artifacts["search_ranges"]
    start, end = found["loss"]
    assert end <= start
    (note,) = [n for n in result.notes if n.startswith("search_ranges")]
    assert "started at" in note
    singles = {}
    for method in ("minmax", "percentile", "mse", "entropy"):
        single = tmp_path / f"{method}.onnx"
        onnxq.run(DIGITS / "digits_cnn.onnx", _recipe(method, False), calib=str(DIGITS / "calib.npz"), output=single)
        singles[method] = _sqnr(single)
    # judged on 8 calibration samples, the held-out result is at least the best single method's, less noise
    assert _sqnr(out) >= max(singles.values()) - 1.0, (_sqnr(out), singles)
    # the chosen ranges are what insert_qdq lowered: every changed group's scale is in the saved model
    scales = {
        t.name: float(numpy_helper.to_array(t).reshape(-1)[0])
        for t in onnx.load(out).graph.initializer
        if t.name.endswith("_scale")
    }
    assert found["chosen"], "nothing changed: the test shows nothing"
    for key, scale in found["scales"].items():
        assert np.isclose(scales[key], scale, rtol=1e-6), key


def test_each_head_slice_is_judged_by_its_own_scale() -> None:
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 320, (1, 4, 100))
    scores = rng.uniform(0, 1, (1, 1, 100))
    y = np.concatenate([boxes, scores], axis=1)
    noisy_scores = y.copy()
    noisy_scores[:, 4] += rng.normal(0, 0.3, 100)  # scores ruined, boxes intact
    signal, noise, peak = slice_energies(y, noisy_scores)
    assert signal.shape == noise.shape == peak.shape == (5,)
    whole = noise.sum() / signal.sum()
    per_slice = float(np.mean(noise / signal))
    assert whole < 1e-5 and per_slice > 0.02  # the whole-output ratio hides what the slices show
