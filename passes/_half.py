"""Half-precision bookkeeping shared by upcast_fp16 (which widens a model) and cleanup (which narrows back
what stayed float), so a quantized half-precision model is never larger on disk than it needs to be."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ._graph import unique_name

UPCAST_KEY = "onnxq.upcast_from"  # model.meta: the half DataType the model was widened from
MIN_ELEMENTS = 16  # smaller constants are not worth a Cast node
_QUANT_READERS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def remember_upcast(model: ir.Model, dtype: ir.DataType) -> None:
    model.meta[UPCAST_KEY] = dtype


def restore_half_initializers(model: ir.Model) -> int:
    """In a model widened by upcast_fp16, store each float32 weight that float ops read (not quantization
    parameters, not a contrib kernel's inputs) in the model's half type again, read through a Cast to
    float32 that onnxruntime folds at load: what stayed float keeps the input's bytes and precision. Values a
    pass computed in float32 (a folded BatchNorm) are rounded to half, as the input model held its own."""
    dtype = model.meta.get(UPCAST_KEY)
    if dtype is None:
        return 0
    graph = model.graph
    half = dtype.numpy()
    restored = 0
    for name, value in sorted(graph.initializers.items()):
        if value.dtype != ir.DataType.FLOAT or value.is_graph_input() or value.is_graph_output():
            continue
        if value.const_value is None or value.const_value.size < MIN_ELEMENTS or not value.uses():
            continue
        if any(u.node.domain not in ("", "ai.onnx") or u.node.op_type in _QUANT_READERS for u in value.uses()):
            continue
        wide = value.const_value.numpy()
        with np.errstate(over="ignore"):
            narrow = wide.astype(half)
        if not np.all(np.isfinite(narrow.astype(np.float32))):
            continue
        stored = ir.Value(
            name=unique_name(graph, f"{name}_{dtype.name.lower()}"),
            shape=value.shape,
            type=ir.TensorType(dtype),
            const_value=ir.tensor(narrow, dtype=dtype),
        )
        graph.register_initializer(stored)
        out = ir.Value(shape=value.shape, type=ir.TensorType(ir.DataType.FLOAT))
        value.replace_all_uses_with(out)
        del graph.initializers[name]
        out.name = name
        graph.append(ir.node("Cast", [stored], {"to": ir.DataType.FLOAT}, outputs=[out], name=f"{name}_upcast"))
        restored += 1
    if restored:
        graph.sort()
    return restored
