"""Shared fixtures: small real graphs saved to disk, and their calibration data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from builders import cnn_data, small_cnn

# CI must be reproducible: the same examples on every run (local runs explore new ones).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "models" / "digits"


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    return path


@pytest.fixture
def cnn_calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=cnn_data())
    return path
