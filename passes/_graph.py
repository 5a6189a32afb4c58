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


def only_reader(value: ir.Value) -> ir.Node | None:
    """The one node that reads `value`, if exactly one does and it is not also a graph output."""
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer under a name unused in the graph. 4-bit arrays are kept packed,
    two values a byte (ml_dtypes spends a byte on each): the int4 codes of a 2 GB model's weights then take
    ~0.26 GB until saved, not ~0.5 GB. Reading the value gives the unpacked array as before."""
    name = unique_name(graph, name)
    dtype = ir.DataType.from_numpy(array.dtype)
    if dtype.bitwidth == 4:
        nibbles = np.ascontiguousarray(array).reshape(-1).view(np.uint8) & 0x0F
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        tensor: ir.TensorProtocol = ir.PackedTensor(
            nibbles[0::2] | (nibbles[1::2] << 4), dtype, shape=array.shape, name=name
        )
    else:
        tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=tensor)
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
        cache = _all_names(graph)
        graph.meta["onnxq.names"] = cache
    return cache


def _all_names(graph: ir.Graph) -> set[str]:
    """Names of the graph and of every subgraph in it: a new name must not shadow a subgraph's (SSA)."""
    names = {v.name for v in iter_values(graph) if v.name} | {n.name for n in graph if n.name}
    for sub in subgraphs(graph):
        names |= {v.name for v in iter_values(sub) if v.name} | {n.name for n in sub if n.name}
    return names


def share_names(graph: ir.Graph) -> None:
    """One name cache for the graph and all its subgraphs, so that names made in a subgraph are unique in
    the whole model (a subgraph may not redefine a name of an enclosing graph)."""
    names = _all_names(graph)
    for g in (graph, *subgraphs(graph)):
        g.meta["onnxq.names"] = names


def forget_names(graph: ir.Graph) -> None:
    """Drop the name cache after edits made outside `unique_name` (e.g. at the end of a pass)."""
    for g in (graph, *subgraphs(graph)):
        g.meta.pop("onnxq.names", None)


def subgraphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    """Every graph nested in `graph` (If branches, Loop and Scan bodies, at any depth), outer ones first."""
    for node in graph:
        for sub in node_subgraphs(node):
            yield sub
            yield from subgraphs(sub)


CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})


def subgraph_levels(graph: ir.Graph) -> list[list[ir.Graph]]:
    """If branches and Loop/Scan bodies by nesting depth: [those of `graph`], [those inside them], …
    (graphs held by other ops, e.g. a custom op's attribute, are not computation the model runs as such)."""
    levels: list[list[ir.Graph]] = []
    current = [graph]
    while nested := [
        sub
        for g in current
        for node in g
        if node.op_type in CONTROL_FLOW and node.domain in ("", "ai.onnx")
        for sub in node_subgraphs(node)
    ]:
        levels.append(nested)
        current = nested
    return levels


def node_subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held in the node's attributes (then/else branches, a body)."""
    found: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend(attr.value)
    return found


def unique_subgraph_value_names(graph: ir.Graph) -> int:
    """Rename values defined in subgraphs whose names another graph also defines (two If branches may
    both call their output `y`), so that a name identifies one tensor in the model. Returns how many."""
    taken = {v.name for v in iter_values(graph) if v.name}
    renamed = 0
    for sub in subgraphs(graph):
        for value in (*sub.inputs, *(out for node in sub for out in node.outputs)):
            if not value.name:
                continue
            if value.name in taken:
                base, i = value.name, 1
                while f"{base}_{i}" in taken:
                    i += 1
                value.name = f"{base}_{i}"
                renamed += 1
            taken.add(value.name)
    return renamed


def iter_values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def try_infer_shapes(model: ir.Model, strict_mode: bool = True) -> bool:
    """onnx shape inference where it helps and is optional: a failure (an unknown op, a contrib op of the
    onnxruntime-genai builder, a 2 GB model) leaves the model as it was, silently; onnx-ir's own warning for
    it is a traceback with an unfilled format string, so it is muted here. True when it ran."""
    import logging

    from onnx_ir.passes.common import ShapeInferencePass

    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        ShapeInferencePass(strict_mode=strict_mode)(model)
        return True
    except Exception:
        return False
    finally:
        logger.setLevel(level)
