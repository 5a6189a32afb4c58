"""Every onnxruntime session onnxq opens: the same options, custom-op libraries, and a clear error.

Calibration, sensitivity, validation and localization all run the model in onnxruntime. A model with an op
onnxruntime has no kernel for (a custom op from another toolchain, a contrib op of a newer release) cannot be
calibrated or validated: that is the user's input, so it is a one-line usage error naming the op and the way
out, not an internal error. Libraries of custom kernels are registered from `ONNXQ_CUSTOM_OPS` (paths
separated by the OS path separator; `--custom-ops` sets it), which worker processes inherit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from onnxq.errors import UsageError

CUSTOM_OPS_ENV = "ONNXQ_CUSTOM_OPS"


class MissingKernel(UsageError):
    """onnxruntime cannot run an op of the model (`op`, e.g. com.example:MyOp)."""

    def __init__(self, op: str) -> None:
        self.op = op
        super().__init__(
            f"onnxruntime has no kernel for {op} in this model, so it cannot calibrate or validate it",
            "register the op's kernel library with --custom-ops LIB (or ONNXQ_CUSTOM_OPS), or use a recipe that "
            "needs no data (w8-block) with --no-validate",
        )


_MISSING_OP = re.compile(
    r"(?P<op>[\w.]+:\w+)\(-?\d+\) is not a registered function/op"
    r"|Could not find an implementation for (?P<impl>\w+\(\d+\))"
)


def custom_op_libraries() -> list[str]:
    return [p for p in os.environ.get(CUSTOM_OPS_ENV, "").split(os.pathsep) if p]


def use_custom_ops(libraries: list[Path]) -> None:
    """Register kernel libraries for this process and the workers it starts; a missing file is a usage error."""
    for library in libraries:
        if not library.is_file():
            raise UsageError(
                f"custom-op library '{library}' does not exist",
                "pass the path of the shared library that implements the model's custom ops",
            )
    os.environ[CUSTOM_OPS_ENV] = os.pathsep.join([*custom_op_libraries(), *(str(p.resolve()) for p in libraries)])


def session(
    model: bytes | str | Path,
    providers: list[str] | None = None,
    threads: int = 0,
    optimization: Any | None = None,
    optimized_path: str | Path | None = None,
    external_data_dir: str | Path | None = None,
):  # type: ignore[no-untyped-def]
    """An InferenceSession on `model` (bytes or a path); `optimization` is an ort.GraphOptimizationLevel.
    Bytes whose initializers live in external data files need `external_data_dir`, the folder those paths
    are relative to (a path input carries its own)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if optimization is not None:
        options.graph_optimization_level = optimization
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    if external_data_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_data_dir))
    for library in custom_op_libraries():
        options.register_custom_ops_library(library)
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own Fail / NotImplemented / InvalidGraph types
        found = _MISSING_OP.search(str(exc))
        if found is None:
            raise
        raise MissingKernel(found.group("op") or found.group("impl")) from None
