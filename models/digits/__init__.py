"""The bundled demo: a small CNN trained on scikit-learn's digits (`train.py` made it), with its calibration
and evaluation data. Installed as `onnxq.demo`, so a wheel user has it too: `onnxq run --demo`, or

    from onnxq import demo
    onnxq.run(demo.MODEL, "int8", calib=str(demo.CALIB), data=str(demo.EVAL), output="digits.q.onnx")
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "digits_cnn.onnx"
CALIB = HERE / "calib.npz"  # 128 training images, input 'x' [N, 1, 8, 8] in [0, 1]
EVAL = HERE / "eval.npz"  # held-out images with a 'label' array
