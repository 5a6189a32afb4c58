"""Calibration: readers that yield feed dicts, streaming collectors, and the instrumented session.

from onnxq.calibration import input_specs, open_data
data = open_data("calib.npz", input_specs(model))      # a re-iterable source of feed batches
context = PassContext(calibration_data=data)            # what passes in your own PassManager read
"""

from __future__ import annotations

from typing import Any

__all__ = ["input_specs", "open_data"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from onnxq.calibration import readers

        return getattr(readers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
