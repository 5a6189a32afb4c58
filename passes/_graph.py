"""Small graph helpers shared by passes (kept here so no pass imports another pass)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from onnxq.ir import is_constant as is_constant  # re-exported: passes take graph helpers from here


def replace_model(model: ir.Model, new: ir.Model) -> None:
    """Move `new`'s contents into `model`: in-place passes that go through protobuf tools use this."""
    model.graph = new.graph
    model.ir_version = new.ir_version
    model.functions.clear()
    model.functions.update(new.functions)


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as numpy if it is a constant: an initializer (not a graph input) or a Constant node."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer under a name unused in the graph."""
    name = unique_name(graph, name)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, base: str) -> str:
    taken = _names(graph)
    if base not in taken:
        taken.add(base)
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    taken.add(f"{base}_{i}")
    return f"{base}_{i}"


def _names(graph: ir.Graph) -> set[str]:
    cache = graph.meta.get("onnxq.names")
    if cache is None:
        cache = {v.name for v in iter_values(graph) if v.name} | {n.name for n in graph if n.name}
        graph.meta["onnxq.names"] = cache
    return cache


def forget_names(graph: ir.Graph) -> None:
    """Drop the name cache after edits made outside `unique_name` (e.g. at the end of a pass)."""
    graph.meta.pop("onnxq.names", None)


def iter_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs
