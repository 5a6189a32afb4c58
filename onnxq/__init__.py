"""onnxq: quantize ONNX models with recipes of graph passes.

import onnxq
result = onnxq.run("model.onnx", "int8", calib="calib.npz")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["PassContext", "__version__", "apply", "passes", "run"]

if TYPE_CHECKING:
    from onnxq import passes
    from onnxq.pass_base import PassContext, apply
    from onnxq.runner import run


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    # Lazy so `onnxq --help` and `onnxq passes` start fast (no onnxruntime import).
    if name == "run":
        from onnxq.runner import run

        return run
    if name in ("apply", "PassContext"):
        from onnxq import pass_base

        return getattr(pass_base, name)
    if name == "passes":
        import importlib

        return importlib.import_module("onnxq.passes")
    raise AttributeError(f"module 'onnxq' has no attribute {name!r}")
