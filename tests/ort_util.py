"""Helpers for tests: run models in onnxruntime and read its optimized graph."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq import ir as onnxq_ir


def as_bytes(model: ir.Model | onnx.ModelProto | Path | str) -> bytes | str:
    if isinstance(model, ir.Model):
        return onnxq_ir.model_bytes(model)
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    return str(model)


def run(model: ir.Model | onnx.ModelProto | Path | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(as_bytes(model), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def optimized_model(model: ir.Model | onnx.ModelProto | Path | str) -> onnx.ModelProto:
    """The graph onnxruntime actually executes on CPU (after its QDQ fusions), subgraphs included."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(as_bytes(model), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def optimized_op_counts(model: ir.Model | onnx.ModelProto | Path | str) -> collections.Counter[str]:
    """Op types of the main graph onnxruntime executes on CPU."""
    return collections.Counter(n.op_type for n in optimized_model(model).graph.node)
