"""Dividing an activation by per-channel scales whose inverse its readers' weights have absorbed.

SmoothQuant and AWQ-style scaling both rewrite X·W as (X / s)·(diag(s)·W). The weights are rescaled by
the caller; here 1/s goes where it costs nothing at run time when the graph allows (into the gamma and
beta of a LayerNormalization that only those readers see, or, for the input of attention's output
projection, into the value projection's weight columns), else into one Mul in front of them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._attention import fold_scale_into_value_projection
from ._graph import add_initializer, constant_array, unique_name


def divide_activation(
    graph: ir.Graph,
    value: ir.Value,
    readers: list[ir.Node],
    scale: np.ndarray,
    fold: bool = True,
    allow_mul: bool = True,
) -> str | None:
    """Make `readers` see value / scale (last axis). Returns how ("layernorm", "value_projection" or "mul"),
    or None when it could not fold and a Mul was not allowed (the graph is then unchanged)."""
    if fold and _fold_into_layernorm(graph, value, readers, scale):
        return "layernorm"
    if fold and fold_scale_into_value_projection(graph, value, readers, scale):
        return "value_projection"
    if not allow_mul:
        return None
    _insert_mul(graph, value, readers, scale)
    return "mul"


def _fold_into_layernorm(graph: ir.Graph, value: ir.Value, readers: list[ir.Node], scale: np.ndarray) -> bool:
    producer = value.producer()
    if producer is None or producer.op_type != "LayerNormalization":
        return False
    if {id(use.node) for use in value.uses()} != {id(node) for node in readers} or value.is_graph_output():
        return False  # another reader needs the unscaled X
    gamma = constant_array(producer.inputs[1])
    beta = constant_array(producer.inputs[2]) if len(producer.inputs) > 2 else None
    if gamma is None or gamma.shape != scale.shape or (beta is not None and beta.shape != scale.shape):
        return False
    producer.replace_input_with(
        1, add_initializer(graph, f"{producer.inputs[1].name}_scaled", (gamma / scale).astype(gamma.dtype))
    )
    if beta is not None:
        producer.replace_input_with(
            2, add_initializer(graph, f"{producer.inputs[2].name}_scaled", (beta / scale).astype(beta.dtype))
        )
    return True


def _insert_mul(graph: ir.Graph, value: ir.Value, readers: list[ir.Node], scale: np.ndarray) -> None:
    inverse = add_initializer(graph, f"{value.name}_smooth_scale", (1.0 / scale).astype(np.float32))
    mul = ir.node("Mul", [value, inverse], name=unique_name(graph, f"{value.name}_smooth"))
    mul.outputs[0].name = unique_name(graph, f"{value.name}_smoothed")
    if value.dtype is not None:
        mul.outputs[0].dtype = value.dtype
    mul.outputs[0].shape = value.shape
    graph.append(mul)
    for node in readers:
        for index, node_input in enumerate(node.inputs):
            if node_input is value:
                node.replace_input_with(index, mul.outputs[0])
    graph.sort()
